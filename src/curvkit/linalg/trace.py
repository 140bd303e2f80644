"""Stochastic trace estimation: Hutchinson and Hutch++."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ArgumentError, CurvkitWarning
from ._util import apply, check_square, generator, operator_blocks, rademacher, retaining, work_dtype
from .results import BlockResults, TraceResult

_CHUNK = 64  # probes per block product: bounds memory for large operators
# A standard error from m samples is itself uncertain: the standardized error follows Student's t
# with m - 1 degrees of freedom, whose spread is sqrt((m-1)/(m-3)) -- 1.7x a normal's at m = 4
# (what Hutch++ keeps of 12 probes), 1.13x at m = 10. Hutch++ keeps at least this many samples
# for its Hutchinson part; with fewer probes than that needs, plain Hutchinson is used.
MIN_SAMPLES = 10


def trace(
    A: Any,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    probes: int = 99,
    seed: int | torch.Generator | None = 0,
    by: str | None = None,
) -> TraceResult | BlockResults:
    r"""Estimate ``tr(A)`` from ``probes`` products with Rademacher vectors.

    "hutchinson": the mean of ``z^T A z`` over ``probes`` probes; ``stderr`` is the sample
    standard deviation over sqrt(probes).

    "hutch++" (Meyer, Musco, Musco, Woodruff 2021): a third of the products sketch the top
    subspace ``Q = orth(A S)``, a third compute ``tr(Q^T A Q)`` exactly, and the last third run
    Hutchinson on the deflated remainder ``(I - QQ^T) A (I - QQ^T)``. When the spectrum decays,
    the remainder has a far smaller variance than ``A``. ``stderr`` is that of the Hutchinson part
    (sample std of the deflated ``g^T A g`` over sqrt(#probes)), i.e. conditional on the sketch:
    the ``tr(Q^T A Q)`` part is exact for the ``Q`` drawn. The Hutchinson part keeps at least
    ``MIN_SAMPLES`` (10) probes, since a standard error from fewer samples is itself too
    uncertain to be an honest error bar (at 4 samples the error exceeded 8 of them over 40 seeds);
    below 20 probes (a sketch of fewer than 5 vectors, which buys less than its products) Hutch++
    runs as plain Hutchinson and says so in ``method``.
    ``samples`` is the number of samples the standard error comes from; fewer than 10 draws a
    :class:`~curvkit.errors.CurvkitWarning`.

    Cost: exactly ``probes`` operator products (in blocks of up to 64 columns). With ``by``, one
    estimate per block of ``A.blocks(by)``, each with ``probes`` products, as :class:`BlockResults`.

    Example:
        >>> import torch, curvkit as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 50, generator=g, dtype=torch.float64)
        >>> A = X.T @ X / 100                      # a matrix, or any operator such as ck.hessian(...)
        >>> r = ck.trace(A, method="hutchinson", probes=30, seed=0)
        >>> r.matvecs
        30
        >>> abs(r.value - float(A.trace())) < 4 * r.stderr
        True
    """
    if method not in ("hutch++", "hutchinson"):
        raise ArgumentError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    least = 4 if method == "hutch++" else 2
    if not isinstance(probes, int) or probes < least:
        raise ArgumentError(f"{method} needs probes >= {least} (to give a standard error), got {probes!r}")
    if by is not None:
        return BlockResults({name: trace(B, method, probes, seed) for name, B in operator_blocks(A, by).items()})
    n = check_square(A)
    with retaining(A):  # the products of one run may share work (the Hessian's gradient graphs)
        return _trace(A, n, method, probes, seed)


def _trace(A: Any, n: int, method: str, probes: int, seed: int | torch.Generator | None) -> TraceResult:
    gen, wd = generator(seed), work_dtype(A.dtype)
    s = min(probes // 3, (probes - MIN_SAMPLES) // 2)
    if method == "hutchinson" or s < MIN_SAMPLES // 2:  # a sketch of < 5 vectors buys less than its products
        if probes < MIN_SAMPLES:
            warnings.warn(
                f"trace: a standard error from {probes} samples is itself uncertain (the error can exceed it "
                f"several times); use probes >= {MIN_SAMPLES} for an error bar you can trust",
                CurvkitWarning, stacklevel=3,
            )
        samples = _quadratic_forms(A, lambda m: rademacher(n, m, gen, wd, A.device), probes)
        value, stderr = _mean_stderr(samples)
        return TraceResult(value, stderr, probes, "hutchinson", probes, probes)

    m = probes - 2 * s
    if s >= n:  # the sketch spans everything: the trace is exact
        return TraceResult(_exact(A, n), 0.0, n, "hutch++", probes, 0)
    S = rademacher(n, s, gen, wd, A.device)
    Q = torch.linalg.qr(_apply_chunked(A, S))[0]
    top = float(torch.sum(Q * _apply_chunked(A, Q)))

    def deflated(k: int) -> Tensor:
        G = rademacher(n, k, gen, wd, A.device)
        return G - Q @ (Q.T @ G)

    samples = _quadratic_forms(A, deflated, m)
    rest, stderr = _mean_stderr(samples)
    return TraceResult(top + rest, stderr, 2 * s + m, "hutch++", probes, m)


def _apply_chunked(A: Any, V: Tensor) -> Tensor:
    return torch.cat([apply(A, V[:, i : i + _CHUNK], "trace probe product") for i in range(0, V.shape[1], _CHUNK)], 1)


def _quadratic_forms(A: Any, draw, m: int) -> Tensor:
    """``z^T A z`` for ``m`` probes drawn in chunks, accumulated in float64."""
    out = []
    for i in range(0, m, _CHUNK):
        Z = draw(min(_CHUNK, m - i))
        out.append(torch.sum(Z * apply(A, Z, "trace probe product"), dim=0).to(torch.float64))
    return torch.cat(out)


def _mean_stderr(x: Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std(correction=1)) / math.sqrt(len(x))


def _exact(A: Any, n: int) -> float:
    eye = torch.eye(n, dtype=work_dtype(A.dtype), device=A.device)
    return sum(float(torch.sum(eye[:, i : i + _CHUNK] * apply(A, eye[:, i : i + _CHUNK]))) for i in range(0, n, _CHUNK))
