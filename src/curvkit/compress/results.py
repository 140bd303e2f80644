"""What pruning returns, and the pieces every compression method shares: the pattern names, the
checkpoint writer and the evaluation of a compressed model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError

STRUCTURED = ("channel", "neuron", "head")
PATTERNS = ("unstructured", "n:m (e.g. '2:4')") + STRUCTURED


@dataclass(frozen=True)
class Pattern:
    """A parsed ``pattern=``: ``kind`` is ``"unstructured"``, ``"n:m"`` or one of
    :data:`STRUCTURED`; for n:m, at most ``n`` weights are kept in every ``m`` consecutive inputs of a
    row (NVIDIA's convention: 2:4 keeps 2 of 4, sparsity ``1 - n/m``)."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an n:m pattern fixes (None for the others)."""
        return 1 - self.n / self.m if self.kind == "n:m" else None

    @property
    def structured(self) -> bool:
        return self.kind in STRUCTURED

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


def parse_pattern(pattern: Any) -> Pattern:
    """``"unstructured"``, ``"2:4"`` (any ``"n:m"`` with ``0 < n < m``), ``"channel"``,
    ``"neuron"`` or ``"head"``."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        if pattern in ("unstructured",) + STRUCTURED:
            return Pattern(pattern)
        parts = pattern.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            n, m = (int(p) for p in parts)
            if 0 < n < m:
                return Pattern("n:m", n, m)
            raise ArgumentError(f"pattern {pattern!r}: n:m needs 0 < n < m (n of every m weights are kept), "
                                "e.g. '2:4'")
    raise ArgumentError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")


def evaluate(model: nn.Module, loss_fn: Any, data: Any, *, max_batch: int | None = None,
             what: str = "the loss over the data") -> dict:
    """Mean loss of ``model`` over ``data`` (batches weighted by their terms, eval mode: curvkit's
    one data loop) and, for classification (integer targets, one score per class), the accuracy
    (None otherwise). Every parameter takes part, frozen ones too (an inference model). Cost: one
    forward pass over ``data``."""
    from ..model import Risk

    risk = Risk(model, loss_fn, data, [n for n, _ in model.named_parameters()], mode="eval", max_batch=max_batch)
    f, p = risk.function(), risk.space.detached()
    hits = [0, 0]

    def batch(x: Any, y: Tensor, _: int):
        with torch.no_grad():
            out = f(p, x)
            if isinstance(out, Tensor) and not y.is_floating_point() and out.shape[:-1] == y.shape:
                hits[0] += int((out.argmax(-1) == y).sum())
                hits[1] += y.numel()
            return [], risk.loss(out, y), risk.weight(out, y)

    loss = float(risk.accumulate(batch, what=what).loss)
    return {"loss": loss, "accuracy": hits[0] / hits[1] if hits[1] else None}


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> Path:
    """``state`` to ``path``: safetensors when the name ends in ``.safetensors`` (needs the
    ``safetensors`` package), else ``torch.save``. Tensors that share storage (tied weights) are
    written as copies under each name, as safetensors requires; loading gives the same values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise ArgumentError(f"writing {path.name} needs the safetensors package: pip install safetensors, "
                                "or save to a .pt file (torch.save)") from e
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    else:
        torch.save({k: v.detach() for k, v in state.items()}, path)
    return path


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """What :func:`save_state_dict` wrote (``.safetensors`` or a ``torch.save`` file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class PruneResult:
    """The outcome of :func:`curvkit.compress.prune`.

    ``model``: the pruned model (a copy unless ``inplace=True``), masks folded in: pruned weights
    are stored zeros, so ``model.state_dict()`` loads into a fresh model of the same architecture
    (unstructured, n:m). Structured patterns give a smaller architecture: ``structure`` records,
    per changed module, its new sizes and the kept indices, and ``rebuild(fresh_model)`` shrinks a
    fresh instance of the original architecture to it so the pruned ``state_dict`` loads.
    ``layers``: per pruned layer, ``name``, ``shape``, ``kept``, ``total``, ``sparsity`` and the
    method's own figures (OBS: ``damping``, ``condition``, ``error``). ``masks``: per layer weight
    (by parameter name), ``True`` where a weight was kept (empty for structured patterns).
    """

    model: nn.Module
    method: str
    pattern: str
    sparsity: float
    layers: list[dict] = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict)
    structure: dict | None = None
    seconds: float = 0.0

    def rebuild(self, model: nn.Module) -> nn.Module:
        """``model`` (a fresh instance of the original architecture) shrunk in place to the pruned
        architecture and returned; unchanged for unstructured and n:m patterns."""
        if not self.structure:
            return model
        from .structured import apply_structure

        return apply_structure(model, self.structure)

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity, "layers": self.layers,
                "structure": self.structure, "seconds": self.seconds}

    def save(self, path: str | Path) -> list[Path]:
        """The pruned ``state_dict`` at ``path`` (``.safetensors`` or ``torch.save``) and, for a
        structured pattern, the structure beside it (``<stem>.structure.json``)."""
        path = Path(path)
        out = [save_state_dict(self.model.state_dict(), path)]
        if self.structure:
            side = path.with_name(path.stem + ".structure.json")
            side.write_text(json.dumps(self.structure, indent=1))
            out.append(side)
        return out


__all__ = ["Pattern", "parse_pattern", "PruneResult", "evaluate", "save_state_dict", "load_state_dict", "STRUCTURED", "PATTERNS"]
