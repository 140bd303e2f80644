"""Checks and helpers shared by the algorithms. An operator is anything with ``shape``,
``dtype``, ``device`` and ``@`` on a 1-D vector or a 2-D block of columns."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, NonFiniteError, ShapeError


def check_square(A: Any) -> int:
    """Return n for an n x n operator; raise ShapeError for anything else."""
    shape = getattr(A, "shape", None)
    if shape is None or not hasattr(A, "__matmul__") or not hasattr(A, "dtype"):
        raise ShapeError(
            f"expected a linear operator with .shape, .dtype, .device and @, got {type(A).__name__}; "
            "pass a curvkit operator (ck.hessian(...)), a torch.Tensor matrix, or wrap your product "
            "in curvkit.operators.FunctionOperator"
        )
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ShapeError(f"the operator must be square, got shape {tuple(shape)}")
    return int(shape[0])


def generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """An explicit generator: same seed, same result (a Generator is used as given)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def rademacher(n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """(n, k) random signs, drawn on the generator's device then moved."""
    z = torch.randint(0, 2, (n, k), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    return z.mul_(2).sub_(1)


def gaussian(n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """(n, k) standard normal entries, drawn on the generator's device then moved."""
    return torch.randn(n, k, generator=gen, device=gen.device, dtype=dtype).to(device)


def apply(A: Any, V: Tensor, what: str = "product") -> Tensor:
    """``A @ V`` with a finiteness check: algorithms stop on a NaN rather than return garbage."""
    out = A @ V
    if not isinstance(out, Tensor) or out.shape != V.shape:
        raise ShapeError(
            f"the operator returned {getattr(out, 'shape', type(out))} for an input of shape "
            f"{tuple(V.shape)}; A @ V must return a tensor of the same shape"
        )
    if not torch.isfinite(out).all():
        raise NonFiniteError(
            f"the operator returned a non-finite {what} (NaN or inf); check the model's loss and "
            "parameters for NaN/inf, or lower the learning rate that produced them"
        )
    return out


def operator_blocks(A: Any, by: str) -> dict:
    """``A.blocks(by)``: the per-layer/per-parameter diagonal blocks, or a clear error."""
    if by not in ("layer", "param"):
        raise ArgumentError(f"by must be None, 'layer' or 'param', got {by!r}")
    if not hasattr(A, "blocks"):
        raise ShapeError(
            f"by={by!r} needs an operator that knows its parameter blocks (a curvkit curvature "
            f"operator such as ck.hessian(...)); {type(A).__name__} has no .blocks(by)"
        )
    return A.blocks(by)

