"""Pool the runs of several ``python -m benchmarks.optim`` processes into one report.

    python -m benchmarks.optim.merge --out DIR PART_DIR [PART_DIR ...]

Each PART_DIR holds a ``results.json``; the merged ``results.json``, ``results.md`` and plots go
to ``--out``. Used where the protocol is split over processes (seeds or optimizers) to fit a
device's time limits.
"""

from __future__ import annotations

import argparse

from .harness import merge


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = merge(args.parts, args.out)
    print(res["markdown"])


if __name__ == "__main__":
    main()
