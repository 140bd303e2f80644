"""The Pareto plot of a :class:`~curvkit.compress.hawq.BitPlan` (matplotlib, via
:func:`curvkit.plotting.pyplot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_frontier(plan: Any, path: Path) -> Path:
    """Size (KiB) against the predicted loss (base + omega/2 when the plan was measured, else
    omega/2) and the measured loss of each frontier point; the plan is a star. Free."""
    from ..plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    base = plan.base_loss if plan.base_loss is not None else 0.0
    size = [p.size / 1024 for p in plan.frontier]
    ax.plot(size, [base + p.predicted_loss_delta for p in plan.frontier], ".-", label="predicted (base + Ω/2)")
    meas = [(p.size / 1024, p.measured_loss) for p in plan.frontier if p.measured_loss is not None]
    if meas:
        ax.plot(*zip(*meas), "o", mfc="none", label="measured")
    ax.plot([plan.size / 1024], [base + plan.predicted_loss_delta], "*", ms=14, label=f"plan ({plan.method})")
    if plan.measured_loss is not None:
        ax.plot([plan.size / 1024], [plan.measured_loss], "*", ms=14, mfc="none", label="plan, measured")
    if plan.base_loss is not None:
        ax.axhline(plan.base_loss, color="gray", lw=0.8, ls=":", label="unquantized")
    ax.set_xlabel("size (KiB, weights with scales + unquantized parameters)")
    ax.set_ylabel("loss" if plan.base_loss is not None else "predicted loss increase")
    ax.set_yscale("log" if plan.base_loss is None and all(p.omega > 0 for p in plan.frontier) else "linear")
    ax.set_title("HAWQ Pareto frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plot_frontier"]
