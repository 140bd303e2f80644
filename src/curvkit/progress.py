"""Progress bars that show on a terminal and stay quiet elsewhere (CI, logs, pipes)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", enabled: bool | None = None, **kw: Any) -> tqdm:
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    kw.setdefault("leave", False)
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, **kw)
