"""Checks and helpers shared by the algorithms. An operator is anything with ``shape``,
``dtype``, ``device`` and ``@`` on a 1-D vector or a 2-D block of columns."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError, NonFiniteError, ShapeError
from ..linear_operator import BlockDiagonalOperator, LinearOperator, same_device
from ..seeding import generator, seed_int

__all__ = ["check_square", "check_symmetric", "generator", "rademacher", "gaussian", "work_dtype", "apply",
           "operator_blocks", "retaining"]


def check_square(A: Any) -> int:
    """Return n for an n x n operator; raise ShapeError for anything else."""
    if isinstance(A, np.ndarray) or type(A).__module__.startswith("scipy"):
        raise ShapeError(
            f"expected a torch operator, got a {type(A).__module__.split('.')[0]} {type(A).__name__}; convert a "
            "matrix with torch.as_tensor(A), or wrap your product in curvkit.linear_operator.FunctionOperator"
        )
    shape = getattr(A, "shape", None)
    if shape is None or not hasattr(A, "__matmul__") or not hasattr(A, "dtype"):
        raise ShapeError(
            f"expected a linear operator with .shape, .dtype, .device and @, got {type(A).__name__}; "
            "pass a curvkit operator (ck.hessian(...)), a torch.Tensor matrix, or wrap your product "
            "in curvkit.linear_operator.FunctionOperator"
        )
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ShapeError(f"the operator must be square, got shape {tuple(shape)}")
    return int(shape[0])


def check_symmetric(A: Any, what: str) -> int:
    """``check_square``, and an ArgumentError for an operator that is not symmetric (a product of
    two different operators, a FunctionOperator declared ``symmetric=False``, a tensor that is
    not equal to its transpose): ``what`` assumes symmetry and would return wrong numbers."""
    n = check_square(A)
    if isinstance(A, Tensor):  # a dense matrix: compare with its transpose (NaN is reported later)
        scale = float(A.abs().max()) if A.numel() else 0.0
        sym = not (scale < float("inf")) or bool((A - A.T).abs().max() <= 1e-6 * scale)
    else:
        sym = getattr(A, "is_symmetric", True)
    if not sym:
        raise ArgumentError(
            f"{what} needs a symmetric operator, and {type(A).__name__} is not symmetric; for A @ B use a "
            "symmetric form (e.g. B @ A @ B for symmetric A, B), or its symmetric part (A + A.T) / 2"
        )
    return n


def rademacher(n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """(n, k) random signs, drawn where they are used (:func:`drawing_generator`)."""
    z = torch.randint(0, 2, (n, k), generator=drawing_generator(gen, device), device=device).to(dtype)
    return z.mul_(2).sub_(1)


def gaussian(n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """(n, k) standard normal entries, drawn where they are used (:func:`drawing_generator`)."""
    return torch.randn(n, k, generator=drawing_generator(gen, device), device=device, dtype=dtype)


def drawing_generator(gen: torch.Generator, device) -> torch.Generator:
    """``gen`` where the draw is on its device; for an accelerator, a generator there seeded by one
    draw of ``gen``: the same draws on every rank and every run with the same seed, without
    drawing 10^8 numbers on the host (1.4 s for 85M Gaussians, the cost of 1.5 Hessian products of
    an 85M-parameter transformer on an H200). A CUDA run thus draws other vectors than a CPU run
    with the same seed."""
    if same_device(device, gen.device):  # a generator of another GPU cannot draw on this one
        return gen
    return torch.Generator(device=device).manual_seed(seed_int(gen))


def work_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype algorithms keep their vectors and sums in: float64 for float64 operators, float32
    otherwise (a bf16/fp16 operator multiplies casts: reductions in float32 or better)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def apply(A: Any, V: Tensor, what: str = "product") -> Tensor:
    """``A @ V`` with a finiteness check (algorithms stop on a NaN rather than return garbage),
    in ``V``'s dtype: a half-precision operator multiplies a cast of ``V`` and its result is cast
    back, so an algorithm can run in :func:`work_dtype` on any operator."""
    # a half-precision LinearOperator takes float32 vectors itself (K-FAC then keeps their precision);
    # a plain tensor or foreign operator gets its own dtype
    takes = V.dtype == A.dtype or (isinstance(A, LinearOperator) and V.dtype == torch.float32)
    out = A @ (V if takes else V.to(A.dtype))
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
    return out if out.dtype == V.dtype else out.to(V.dtype)


def operator_blocks(A: Any, by: str) -> BlockDiagonalOperator:
    """``A.blocks(by)``: the operator hands out its own per-layer/per-parameter diagonal blocks
    (linear algebra knows nothing of layers), or a clear error."""
    if by not in ("layer", "param", "example"):
        raise ArgumentError(f"by must be None, 'layer', 'param' or 'example' (ck.input_hessian), got {by!r}")
    if not hasattr(A, "blocks"):
        raise ShapeError(
            f"by={by!r} needs an operator that knows its parameter blocks (a curvkit curvature "
            f"operator such as ck.hessian(...)); {type(A).__name__} has no .blocks(by)"
        )
    return A.blocks(by)


def retaining(A: Any) -> contextlib.AbstractContextManager:
    """``A.retaining()`` where the operator has it, for the products of one run (a curvature
    operator keeps each batch's work between them: the Hessian's gradient graphs), else nothing
    (a plain tensor, a foreign operator)."""
    enter = getattr(A, "retaining", None)
    return enter() if callable(enter) else contextlib.nullcontext()
