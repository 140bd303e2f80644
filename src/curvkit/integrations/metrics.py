"""What the framework adapters log: a monitor record as flat ``{name: float}`` metrics."""

from __future__ import annotations

from typing import Any

from ..errors import CurvkitError


class FrameworkMissing(CurvkitError, ImportError):
    """The framework an adapter is for is not installed (an ImportError too, so optional imports work)."""


def record_metrics(rec: Any, prefix: str = "curvature/") -> dict[str, float]:
    """The scalars of a :class:`~curvkit.monitor.Record`: each quantity's leading value (top
    eigenvalue, trace, overlap, outlier count, per-layer values as ``layer_sharpness/NAME``), its
    threshold as ``NAME_threshold`` and error as ``NAME_error``, the probe loss, and ``nonfinite``
    (1.0 for a record that met NaN/inf). Free."""
    out: dict[str, float] = {f"{prefix}nonfinite": float(rec.nonfinite)}
    if rec.loss is not None:
        out[f"{prefix}probe_loss"] = float(rec.loss)
    for name, v in rec.values.items():
        if isinstance(v, dict):
            for layer, lv in v.items():
                out[f"{prefix}{name}/{layer}"] = float(lv)
            continue
        out[f"{prefix}{name}"] = float(v[0] if isinstance(v, list) else v)
        e = rec.errors.get(name)
        if e is not None and not isinstance(e, dict):
            out[f"{prefix}{name}_error"] = float(e[0] if isinstance(e, list) else e)
        t = rec.thresholds.get(name)
        if t is not None:
            out[f"{prefix}{name}_threshold"] = float(t)
    if "batch_over_full" in rec.info:
        out[f"{prefix}batch_over_full"] = float(rec.info["batch_over_full"])
    out[f"{prefix}seconds"] = float(rec.seconds.get("total", 0.0))
    return out


def finish(monitor: Any, writer: bool, jsonl: Any, plot_path: Any) -> None:
    """End of training for an adapter: close the monitor's progress line and, on the one writing
    process (rank 0 under DDP), write its JSONL and plot."""
    if monitor is None:
        return
    monitor.close()
    if not writer:
        return
    if jsonl:
        monitor.to_jsonl(jsonl)
    if plot_path and monitor.history:
        monitor.plot(plot_path)
