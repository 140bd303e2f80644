"""M-FAC global pruning (curvkit.compress.mfac_prune) against global magnitude pruning on the
MNIST-5k CNN and the char-LM transformer (benchmarks/compress_models.py), held-out loss and
accuracy at 50/70/90% sparsity over all linear and conv2d weights, several seeds (a seed is a
separately trained model).

Rows: ``magnitude`` (lowest |w| over all targets), ``mfac-scores`` (the OBS saliency
w^2 / 2[F^-1]_qq, no weight update) and ``mfac`` (saliency and WoodFisher's one-shot update).
The window holds per-example gradients of the first ``--window`` calibration examples
(training split); nothing is tuned on the held-out batches.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_mfac.py            # full (CPU: a few minutes)
    PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_mfac.py --quick    # smoke test

Writes ``results.json`` under $OUT, else benchmarks/results/compress-mfac/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compress_models import trained  # noqa: E402
from curvkit.compress.mfac import SUPPORTED, mfac_prune  # noqa: E402
from curvkit.model import layers  # noqa: E402


def targets(model):
    return [layer for layer in layers(model) if layer.kind in SUPPORTED and layer.weight and not layer.tied]


def magnitude(model, sparsity):
    ts = targets(model)
    ws = [t.module.weight for t in ts]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in ws])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    with torch.no_grad():
        for w, m in zip(ws, keep.split([w.numel() for w in ws])):
            w.mul_(m.view_as(w))


def run(workloads, sparsities, seeds, device, window, quick, log=print):
    rows = []
    for name in workloads:
        for seed in seeds:
            tr = trained(name, seed, device)
            base = tr.evaluate(tr.model)
            rows.append(dict(workload=name, seed=seed, method="dense", sparsity=0.0, **base, seconds=0.0))
            calib = tr.calibration[:2] if quick else tr.calibration
            for s in sparsities:
                for method in ("magnitude", "mfac-scores", "mfac"):
                    model = tr.fresh()
                    t0 = time.perf_counter()
                    if method == "magnitude":
                        magnitude(model, s)
                    else:
                        mfac_prune(model, targets(model), tr.loss_fn, calib, sparsity=s, pattern="unstructured",
                                   damping="auto", block_size=128, seed=seed, progress=None, max_batch=None,
                                   window=window, update=method == "mfac")
                    if device != "cpu":
                        torch.cuda.synchronize()
                    sec = time.perf_counter() - t0
                    res = tr.evaluate(model)
                    rows.append(dict(workload=name, seed=seed, method=method, sparsity=s, **res, seconds=sec))
                    log(f"{name} seed {seed} {method:12s} {s:.0%}: loss {res['loss']:.4f} acc {res['accuracy']:.4f} "
                        f"({sec:.2f} s)")
    return rows


def table(rows):
    out = ["| workload | sparsity | method | held-out loss (mean ± sd) | accuracy (mean ± sd) | seconds |",
           "|---|---|---|---|---|---|"]
    keys = sorted({(r["workload"], r["sparsity"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], ["dense", "magnitude", "mfac-scores", "mfac"].index(k[2])))
    for w, s, m in keys:
        sel = [r for r in rows if (r["workload"], r["sparsity"], r["method"]) == (w, s, m)]
        ls, acc = [r["loss"] for r in sel], [r["accuracy"] for r in sel]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        out.append(f"| {w} | {s:.0%} | {m} | {statistics.mean(ls):.4f} ± {sd(ls):.4f} | "
                   f"{statistics.mean(acc):.4f} ± {sd(acc):.4f} | {statistics.mean(r['seconds'] for r in sel):.2f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, the CNN only, 50%% and 90%%, 2 calibration batches")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=256, help="per-example gradients in the M-FAC window")
    ap.add_argument("--workloads", nargs="+", default=["mnist_cnn", "char_lm"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    workloads = ["mnist_cnn"] if a.quick else a.workloads
    sparsities = [0.5, 0.9] if a.quick else [0.5, 0.7, 0.9]
    seeds = list(range(1 if a.quick else a.seeds))
    window = min(a.window, 64) if a.quick else a.window
    t0 = time.perf_counter()
    rows = run(workloads, sparsities, seeds, a.device, window, a.quick)
    md = table(rows)
    print(md)
    out = Path(a.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "compress-mfac")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if a.device != "cpu" else "cpu", torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), window=window, quick=a.quick, seconds=time.perf_counter() - t0,
                command="python benchmarks/compress_mfac.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / ("results-quick.json" if a.quick else "results.json")).write_text(json.dumps(dict(meta=meta, rows=rows),
                                                                                       indent=1))
    return rows


if __name__ == "__main__":
    main()
