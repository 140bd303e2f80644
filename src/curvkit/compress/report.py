"""``curvkit compress``'s report: run one compression method on a model and its data, measure the
result on held-out data, and write the plan or the compressed checkpoint with JSON, Markdown and a
plot. The command line is thin over :func:`compress_report`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArgumentError
from ..plotting import pyplot
from .quantizers import stored_bits
from .results import evaluate

BITS_METHODS = ("hawq",)
PRUNE_METHODS = ("magnitude", "obs", "mfac", "oba")
QUANT_METHODS = ("gptq", "rtn")
METHODS = BITS_METHODS + PRUNE_METHODS + QUANT_METHODS


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied tensors once), at their dtypes."""
    return int(stored_bits(model)) // 8


@dataclass
class CompressReport:
    """What :func:`compress_report` returns: ``kind`` ("bits", "prune", "quantize"), the method,
    held-out ``before`` / ``after`` (loss, accuracy), the sizes, the method's result (``plan``: a
    BitPlan; ``result``: a PruneResult or QuantizeResult) and ``settings``."""

    kind: str
    method: str
    description: str
    before: dict
    after: dict
    size_before: int
    size_after: float
    result: Any = field(repr=False)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "method": self.method, "description": self.description, "before": self.before,
                "after": self.after, "size_before": self.size_before, "size_after": self.size_after,
                "compression": self.size_before / self.size_after if self.size_after else None,
                "seconds": self.seconds, "settings": self.settings, "result": self.result.to_dict()}

    def to_markdown(self) -> str:
        b, a = self.before, self.after
        acc = (lambda d: "" if d.get("accuracy") is None else f", accuracy {d['accuracy']:.2%}")
        lines = [f"# curvkit compress: {self.method}", "", self.description, "",
                 f"- held-out before: loss {b['loss']:.4f}{acc(b)}",
                 f"- held-out after: loss {a['loss']:.4f}{acc(a)}",
                 f"- size: {self.size_before:,} bytes -> {self.size_after:,.0f} bytes "
                 f"({self.size_before / self.size_after:.2f}x smaller)" if self.size_after else "",
                 f"- {self.seconds:.1f} s", ""]
        r = self.result
        if self.kind == "bits":
            lines += [f"HAWQ ({r.method}): predicted loss increase {r.predicted_loss_delta:.4g} "
                      "(omega/2, second-order Taylor with the trace per layer)", "",
                      "| layer | bits | mean trace | parameters |", "|---|---|---|---|"]
            for row in r.layers:
                lines.append(f"| {row['name']} | {r.bits[row['name']]} | {row['mean_trace']:.4g} | {row['parameters']:,} |")
            lines += ["", f"Pareto frontier: {len(r.frontier)} points (pareto.png: size against predicted and "
                          "measured loss)."]
        else:
            keys = [k for k in ("sparsity", "kept", "total", "damping", "condition", "error") if any(k in row for row in r.layers)]
            lines += ["| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for row in r.layers:
                lines.append(f"| {row['name']} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out: str | Path, checkpoint_format: str = "safetensors") -> list[Path]:
        """``compress.json``, ``compress.md``, a plot (``pareto.png`` for a plan, ``layers.png``
        otherwise) and, for pruning and quantization, the compressed ``state_dict``
        (``model.safetensors`` or ``model.pt``; a structured pattern adds its structure file)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        (out / "compress.json").write_text(json.dumps(_json_safe(self.to_dict()), indent=1, allow_nan=False))
        (out / "compress.md").write_text(self.to_markdown())
        paths += [out / "compress.json", out / "compress.md"]
        if self.kind == "bits":
            paths.append(self.result.plot(out / "pareto.png"))
        else:
            paths.append(_layers_plot(self, out / "layers.png"))
            saved = self.result.save(out / ("model.safetensors" if checkpoint_format == "safetensors" else "model.pt"))
            paths += saved if isinstance(saved, list) else [saved]
        return paths


def _json_safe(v: Any) -> Any:
    """Standard JSON: a non-finite float (a singular layer's condition number) becomes the string
    ``"inf"``/``"-inf"``/``"nan"`` rather than the non-standard ``Infinity``."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _layers_plot(rep: CompressReport, path: Path) -> Path:
    plt = pyplot()
    rows = rep.result.layers
    key = "sparsity" if rep.kind == "prune" else "error"
    names = [r["name"] for r in rows]
    vals = [float(r.get(key) or 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.2))
    ax.bar(range(len(rows)), vals, color="tab:blue")
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("sparsity" if key == "sparsity" else "output error on the calibration data")
    if key == "error":
        ax.set_yscale("log")
    ax.set_title(f"{rep.method}: per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_size(text: Any) -> float | str:
    """``--size-budget``: bytes (``"20000"``, ``"20kB"``, ``"1.5MB"``, ``"2MiB"``) or ``"<N>bit"``
    (the size of every quantized layer at N bits, kept as the string)."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().replace(" ", "")
    low = s.lower()
    if low.endswith("bit") and low[:-3].isdigit():
        return low
    units = {"kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}
    for u, f in units.items():
        if low.endswith(u):
            low, factor = low[: -len(u)], f
            break
    else:
        factor = 1
    try:
        value = float(low) * factor
    except ValueError:
        raise ArgumentError(f"--size-budget {text!r}: give bytes (e.g. 20000, 20kB, 1.5MB) or the size of a uniform "
                            "width (e.g. 4bit)") from None
    if not value > 0:
        raise ArgumentError(f"--size-budget must be > 0, got {text!r}")
    return value


def compress_report(model: nn.Module, loss_fn: Any, data: Any, heldout: Any, *, method: str = "hawq",
                    bits: tuple[int, ...] = (2, 4, 8), size_budget: Any = None, loss_budget: float | None = None,
                    sparsity: float | None = None, pattern: str = "unstructured", scope: str | None = None,
                    group_size: int | None = None, damping: Any = "auto", params: Any = None, steps: int = 1,
                    seed: int = 0,
                    progress: bool | None = None, description: str = "", settings: dict | None = None) -> CompressReport:
    """Compress ``model`` with ``method`` and measure it on ``heldout``; the model is not changed.

    ``"hawq"``: :func:`~curvkit.compress.allocate_bits` over ``bits`` under ``size_budget``
    (bytes, or ``"<N>bit"``: the size of uniform N-bit weights; default the median width) or
    ``loss_budget``, every frontier point measured on ``heldout``. ``"magnitude" | "obs" | "mfac" |
    "oba"``: :func:`~curvkit.compress.prune` at ``sparsity`` (default 0.5, or what an n:m pattern
    fixes; ``steps`` rounds for a structured pattern). ``"gptq" | "rtn"``: :func:`~curvkit.compress.quantize` at ``bits[0]`` bits.

    Cost: the method's (see each function) plus a forward pass over ``heldout`` before and after
    (and one per frontier point for hawq).
    """
    import time

    from . import allocate_bits, prune, quantize

    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {' | '.join(METHODS)}")
    if method not in PRUNE_METHODS and steps != 1:
        raise ArgumentError(f"steps (rounds of structured pruning) is for the pruning methods, not {method!r}")
    t0 = time.perf_counter()
    before = evaluate(model, loss_fn, heldout)
    size_before = parameter_bytes(model)
    if method == "hawq":
        if size_budget is None and loss_budget is None:
            size_budget = f"{sorted(bits)[len(bits) // 2]}bit"
        size_budget = None if size_budget is None else parse_size(size_budget)
        plan = allocate_bits(model, loss_fn, data, bits, size_budget=size_budget, loss_budget=loss_budget,
                             params=params, seed=seed, progress=progress)
        plan.measure(model, loss_fn, heldout)
        after = evaluate(plan.apply(model), loss_fn, heldout)
        kind, result, size_after = "bits", plan, plan.size
    elif method in PRUNE_METHODS:
        result = prune(model, loss_fn, data, sparsity=sparsity if sparsity is not None or ":" in pattern else 0.5,
                       method=method, pattern=pattern, scope=scope, params=params, damping=damping, steps=steps,
                       seed=seed, progress=progress)
        after = evaluate(result.model, loss_fn, heldout)
        kind, size_after = "prune", _pruned_size(result)
    else:
        result = quantize(model, data, bits[0], method=method, params=params, group_size=group_size,
                          damping=damping, progress=progress)
        after = evaluate(result.model, loss_fn, heldout)
        kind, size_after = "quantize", result.size
    return CompressReport(kind, method, description, before, after, size_before, size_after, result,
                          dict(settings or {}), time.perf_counter() - t0)


def _pruned_size(result: Any) -> float:
    """Bytes of a pruned model stored sparse: the kept weights of the pruned layers at their dtype
    plus one bit each of mask, everything else dense (a structured result is simply smaller)."""
    if result.structure:
        return float(parameter_bytes(result.model))
    sparse = {id(p): int(mask.sum()) * p.element_size() * 8 + mask.numel()
              for name, p in result.model.named_parameters() if (mask := result.masks.get(name)) is not None}
    return stored_bits(result.model, sparse) / 8
