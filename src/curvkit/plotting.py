"""matplotlib for curvkit's figures (the ``plot`` extra): imported only when a figure is drawn."""

from __future__ import annotations

import sys
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the Agg backend unless pyplot is already in use (a notebook keeps
    its inline backend; a script or a headless machine opens no window). Raises a CurvkitError
    that says how to install matplotlib where it is missing."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the install
        from .errors import CurvkitError

        raise CurvkitError("plots need matplotlib: pip install 'curvkit[plot]'") from e
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
