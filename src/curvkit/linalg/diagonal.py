"""Stochastic diagonal estimation (Hutchinson / Bekas et al.)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentError
from ._util import apply, check_square, generator, operator_blocks, rademacher, retaining, work_dtype
from .results import BlockResults, DiagonalResult

_CHUNK = 64  # probes per block product: bounds memory for large operators


def hutchinson_samples(A: Any, probes: int, gen: torch.Generator) -> torch.Tensor:
    r"""``(n, probes)`` samples ``z * (A z)`` over Rademacher probes ``z`` drawn from ``gen``.

    Each column is an unbiased estimate of ``diag(A)``; :func:`diagonal` averages them and the
    optimizers in :mod:`curvkit.optim` feed them to their preconditioners. In ``work_dtype(A.dtype)``;
    raises NonFiniteError if a product is NaN/inf. Cost: ``probes`` operator products (one block).
    """
    Z = rademacher(check_square(A), probes, gen, work_dtype(A.dtype), A.device)
    return Z * apply(A, Z, "diagonal probe product")


def diagonal(
    A: Any,
    probes: int = 100,
    seed: int | torch.Generator | None = 0,
    by: str | None = None,
) -> DiagonalResult | BlockResults:
    r"""Estimate ``diag(A)`` as the mean of ``z * (A z)`` over Rademacher probes ``z``.

    Each sample's entry ``i`` is ``A_ii + sum_{j != i} A_ij z_i z_j``: unbiased, with variance
    ``sum_{j != i} A_ij^2``, so a diagonally dominant operator needs few probes. ``stderr`` is
    the element-wise sample standard deviation over sqrt(probes). Accumulated in float64.

    Cost: ``probes`` operator products (in blocks of up to 64 columns). With ``by``, one estimate
    per block of ``A.blocks(by)`` (products of the smaller block operators), as BlockResults.

    Example:
        >>> import torch, curvkit as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 50, generator=g, dtype=torch.float64)
        >>> A = X.T @ X / 100
        >>> d = ck.diagonal(A, probes=100, seed=0)
        >>> d.value.shape, d.matvecs
        (torch.Size([50]), 100)
        >>> bool(((d.value - A.diagonal()).abs() < 4 * d.stderr).all())
        True
    """
    if not isinstance(probes, int) or probes < 2:
        raise ArgumentError(f"diagonal needs probes >= 2 (to give a standard error), got {probes!r}")
    if by is not None:
        return BlockResults({name: diagonal(B, probes, seed) for name, B in operator_blocks(A, by).items()})
    n = check_square(A)
    gen = generator(seed)
    mean = torch.zeros(n, dtype=torch.float64, device=A.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations, merged chunk by chunk (Chan et al.)
    seen = 0
    with retaining(A):  # the products of one run may share work (the Hessian's gradient graphs)
        for i in range(0, probes, _CHUNK):
            S = hutchinson_samples(A, min(_CHUNK, probes - i), gen).to(torch.float64)
            c, cm = S.shape[1], S.mean(1)
            delta = cm - mean
            m2 += ((S - cm[:, None]) ** 2).sum(1) + delta**2 * seen * c / (seen + c)
            mean += delta * c / (seen + c)
            seen += c
    var = m2 / (probes - 1)
    wd = work_dtype(A.dtype)
    return DiagonalResult(mean.to(wd), (var / probes).sqrt().to(wd), probes, probes)
