"""Outlier eigenvalues: the few eigenvalues that stand apart from the bulk of a spectrum, and the
fraction of a vector (a gradient) in a top eigenspace."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, ShapeError
from .density import spectral_density
from .lanczos import eigenvalues
from .results import DensityResult, EigenResult

RULE_EDGE = (
    "outliers are the top-k Lanczos eigenvalues that exceed the bulk edge of the SLQ density (in each probe "
    "the largest quadrature node standing for >= {min_count:g} eigenvalues, median over probes) by more than "
    "their residual plus {margin:g} x the bulk's half-width (edge minus the spectrum's median), cut at the "
    "deepest ratio gap lambda_i / lambda_(i+1) >= {gap:g} among them if there is one (a heavy tail of the bulk "
    "below it); a count of k means k was too small to see the bulk"
)
RULE_GAP = (
    "outliers are the top-k Lanczos eigenvalues above the largest ratio gap lambda_i / lambda_(i+1) "
    "among the positive ones, counted only if that gap is at least 2 (else 0); a count of k-1 or more "
    "means k was too small to see the gap"
)


@dataclass(frozen=True)
class OutlierResult:
    """The outliers of a spectrum. ``count`` eigenvalues ``values`` (descending) lie above
    ``threshold`` (the bulk edge plus the margin, or the geometric mean across the ratio gap for
    the gap rule, None there when nothing stands out); ``bulk_edge`` the SLQ bulk edge (None for the gap rule);
    ``gap_ratio`` the ratio ``lambda_count / lambda_(count+1)`` across the boundary (the largest
    ratio gap when the count is 0 under the gap rule; None where undefined); ``capped_at_k``
    whether the count may be limited by ``k``; ``rule`` the rule in words; ``matvecs`` the products spent."""

    count: int
    values: Tensor
    threshold: float | None
    bulk_edge: float | None
    gap_ratio: float | None
    capped_at_k: bool
    rule: str
    matvecs: int


def outliers(
    A: Any = None,
    k: int = 20,
    *,
    eigen: EigenResult | None = None,
    density: DensityResult | bool = True,
    min_count: float = 10.0,
    margin: float = 0.25,
    gap: float = 2.0,
    tol: float = 1e-3,
    iterations: int = 80,
    probes: int = 8,
    seed: int | torch.Generator | None = 0,
    progress: bool | None = None,
) -> OutlierResult:
    r"""The outlier eigenvalues of a symmetric operator: those above the bulk of its spectrum.

    Rule (``density`` given or True): the top-``k`` eigenvalues (Lanczos, ``eigen=`` or computed)
    that exceed the bulk edge :meth:`DensityResult.bulk_edge` of the SLQ density by more than their
    own residual plus ``margin`` times the bulk's half-width (the edge minus the median of the
    spectrum, both from the density): the edge estimate lies a little inside the bulk (a Gauss node
    near an edge carries little mass), and the margin keeps the eigenvalues of the bulk's own edge
    out of the count. Where the bulk has a heavy tail (sparse eigenvalues above the edge, decaying
    smoothly), the outliers are those above the deepest ratio gap ``lambda_i / lambda_(i+1) >= gap``
    among the eigenvalues above the edge, if there is one. This works where the outliers spread out geometrically (as the k-1 outliers of a
    k-class network do at convergence), which a ratio-gap rule cannot see: consecutive outliers
    there differ by less than 2x. With ``density=False`` the ratio-gap rule is used instead
    (outliers above the largest ratio gap ``lambda_i / lambda_(i+1) >= 2``).

    Args:
        A: the operator (not needed when ``eigen`` and a ``DensityResult`` are both given).
        k: how many top eigenvalues to compute (more than the outliers you expect).
        eigen: top eigenpairs already computed (their ``k`` is used).
        density: a :func:`~curvkit.linalg.spectral_density` result, True to compute one
            (``iterations``, ``probes``, ``seed``), or False for the ratio-gap rule.
        min_count: see :meth:`DensityResult.bulk_edge`.
        margin: how far above the edge (in bulk half-widths) an outlier must lie.
        gap: the ratio that separates outliers from a heavy tail above the edge.

    Cost: what is not given: ``eigenvalues(A, k)`` (a few times ``k`` products) and
    ``iterations * probes`` products for the density. Free when both are given.

    Example:
        >>> import torch, curvkit as ck
        >>> lam = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(0)),
        ...                  torch.tensor([1.6, 2.5, 4.0, 6.0])])       # 4 outliers spread out
        >>> r = ck.outliers(torch.diag(lam).double(), k=6, tol=1e-6)
        >>> r.count, [round(float(v), 3) for v in r.values]
        (4, [6.0, 4.0, 2.5, 1.6])
        >>> ck.outliers(torch.diag(lam).double(), k=6, density=False).count   # no ratio gap >= 2
        0
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArgumentError(f"k must be a positive integer, got {k!r}")
    if not min_count > 0:
        raise ArgumentError(f"min_count must be positive, got {min_count!r}")
    if A is None and (eigen is None or (density is not False and not isinstance(density, DensityResult))):
        raise ArgumentError("pass the operator A, or both eigen= (an EigenResult) and density= (a DensityResult "
                            "or False)")
    matvecs = 0
    if eigen is None:
        eigen = eigenvalues(A, k=k, tol=tol, seed=seed, progress=progress)
        matvecs += eigen.matvecs
    elif not isinstance(eigen, EigenResult):
        raise ArgumentError(f"eigen must be an EigenResult (of ck.eigenvalues), got {type(eigen).__name__}")
    vals = eigen.values.detach().double().cpu()
    res = eigen.residuals.detach().double().cpu()
    order = torch.argsort(vals, descending=True)
    vals, res = vals[order], res[order]
    if density is False:
        return _gap_rule(vals, matvecs)
    if density is True:
        density = spectral_density(A, iterations=iterations, probes=probes, seed=seed, progress=progress)
        matvecs += density.matvecs
    if not isinstance(density, DensityResult):
        raise ArgumentError(f"density must be a DensityResult, True or False, got {type(density).__name__}")
    edge = density.bulk_edge(min_count)
    cut = edge + margin * max(edge - _median(density), 0.0)
    above = vals - res > cut
    count = int(above.long().cumsum(0).eq(torch.arange(1, len(vals) + 1)).sum())  # the leading run above
    pos = vals[:count]
    if count >= 2 and bool((pos > 0).all()):
        gaps = (pos[:-1] / pos[1:] >= gap).nonzero()
        if len(gaps):
            count = int(gaps[-1, 0]) + 1
    ratio = None
    if 0 < count < len(vals) and vals[count] > 0:
        ratio = float(vals[count - 1] / vals[count])
    return OutlierResult(count=count, values=vals[:count], threshold=cut, bulk_edge=edge,
                         gap_ratio=ratio, capped_at_k=count >= len(vals),
                         rule=RULE_EDGE.format(min_count=min_count, margin=margin, gap=gap), matvecs=matvecs)


def _median(d: DensityResult) -> float:
    """The median of the spectrum: of the quadrature nodes pooled over probes, by weight."""
    nodes, w = d.nodes.reshape(-1), (d.weights / d.weights.shape[0]).reshape(-1)
    order = torch.argsort(nodes)
    cum = torch.cumsum(w[order], 0)
    i = int(torch.searchsorted(cum, 0.5 * float(cum[-1])))
    return float(nodes[order][min(i, len(nodes) - 1)])


def _gap_rule(vals: Tensor, matvecs: int) -> OutlierResult:
    pos = [float(v) for v in vals if v > 0]
    ratios = [pos[i] / pos[i + 1] for i in range(len(pos) - 1)]
    best = max(range(len(ratios)), key=ratios.__getitem__, default=None)
    if best is None or ratios[best] < 2:
        return OutlierResult(0, vals[:0], None, None, max(ratios, default=None), False, RULE_GAP, matvecs)
    count = best + 1
    return OutlierResult(count, vals[:count], math.sqrt(pos[best] * pos[best + 1]), None, ratios[best],
                         count >= len(vals) - 1, RULE_GAP, matvecs)


def grad_overlap(vectors: EigenResult | Tensor, g: Tensor) -> float:
    r"""The fraction of ``g`` in the span of ``vectors``: ``||Q^T g||^2 / ||g||^2`` with ``Q`` an
    orthonormal basis of the span (the vectors of an :class:`EigenResult` are orthonormal
    already; a plain block is orthonormalized by QR). In [0, 1]; NaN for a zero ``g``.
    Gur-Ari, Roberts, Dyer (2018) found the gradient of a trained network almost entirely in the
    top-k Hessian eigenspace (k the number of classes).

    Cost: one QR of the block for a plain tensor, then ``O(n k)``; no operator product.

    Example:
        >>> import torch, curvkit as ck
        >>> V = torch.eye(4, dtype=torch.float64)[:, :2]
        >>> ck.grad_overlap(V, torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64))
        0.36
    """
    if isinstance(vectors, EigenResult):
        Q = vectors.vectors
    elif isinstance(vectors, Tensor) and vectors.dim() in (1, 2):
        Q = torch.linalg.qr(vectors[:, None] if vectors.dim() == 1 else vectors)[0]
    else:
        raise ShapeError(f"vectors must be an EigenResult or an (n,) / (n, k) tensor, got "
                         f"{tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__}")
    if not isinstance(g, Tensor) or g.dim() != 1 or g.shape[0] != Q.shape[0]:
        raise ShapeError(f"g must be a flat vector of length {Q.shape[0]} (the operator's order), got "
                         f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
    g = g.detach().to(device=Q.device, dtype=Q.dtype)
    gg = float(g @ g)
    if gg == 0:
        return math.nan
    return min(1.0, float((Q.T @ g).square().sum()) / gg)


__all__ = ["outliers", "grad_overlap", "OutlierResult"]
