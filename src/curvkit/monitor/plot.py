"""The monitor's figure: one panel per quantity against the step, thresholds as dashed lines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LABELS = {
    "loss": "probe loss", "sharpness": "sharpness λ_max", "preconditioned_sharpness": "preconditioned sharpness",
    "trace": "trace", "grad_overlap": "gradient in top-k eigenspace", "outliers": "outlier eigenvalues",
    "layer_sharpness": "per-layer λ_max", "batch_sharpness": "batch sharpness",
}


def _series(history: list, name: str) -> tuple[list[int], list[float], list[float], list[Any]]:
    steps, vals, errs, thr = [], [], [], []
    for r in history:
        if r.nonfinite:
            continue
        if name == "loss":
            v, e, t = r.loss, 0.0, None
        else:
            v, e, t = r.top(name), r.errors.get(name), r.thresholds.get(name)
            if isinstance(e, list):
                e = e[0] if e else 0.0
            elif isinstance(e, dict):
                e = 0.0
        if v is None:
            continue
        steps.append(r.step)
        vals.append(float(v))
        errs.append(float(e or 0.0))
        thr.append(t)
    return steps, vals, errs, thr


def plot_history(history: list, path: str | Path) -> Path:
    """Draw the records of a :class:`~curvkit.monitor.CurvatureMonitor` to ``path`` (PNG, SVG...)."""
    from ..plotting import pyplot

    plt = pyplot()
    names = ["loss"] + [n for n in LABELS if n != "loss" and any(n in r.values for r in history)]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps, vals, errs, thr = _series(history, name)
        if name == "layer_sharpness":
            layer_names = sorted({k for r in history for k in r.values.get(name, {})})
            for ln in layer_names:
                pts = [(r.step, r.values[name][ln]) for r in history if not r.nonfinite and ln in r.values.get(name, {})]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", ms=3, label=ln)
            if len(layer_names) <= 8:
                ax.legend(fontsize=7)
        else:
            ax.errorbar(steps, vals, yerr=errs, fmt=".-", ms=3, capsize=2, label=LABELS[name])
        if any(t is not None for t in thr):
            ax.step(steps, [t if t is not None else math.nan for t in thr], "--", color="tab:red", where="post",
                    label="stability threshold")
            ax.legend(fontsize=7)
        bad = [r.step for r in history if r.nonfinite]
        for s in bad:
            ax.axvline(s, color="k", alpha=0.3, lw=0.8)
        ax.set_ylabel(LABELS[name], fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
