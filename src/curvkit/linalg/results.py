"""Result objects of the linear-algebra algorithms.

Every result states its cost in operator products (``matvecs``: one product with one column
counts 1, a block product with k columns counts k) and how good it is (a standard error, a
residual norm, or a convergence flag).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    ``values`` (k,) sorted as the algorithm's ``which`` asks (descending for "largest");
    ``vectors`` (n, k) orthonormal columns; ``residuals`` (k,) the true ``||A v - lambda v||``;
    ``converged`` whether every pair met the tolerance.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    iterations: int = 0


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its standard error (0 for an exact trace); ``samples`` is the number
    of random samples that standard error comes from (0 when exact)."""

    value: float
    stderr: float
    matvecs: int
    method: str = "hutchinson"
    probes: int = 0
    samples: int = 0


@dataclass(frozen=True)
class DiagonalResult:
    """A diagonal estimate (n,) with its element-wise standard error (n,)."""

    value: Tensor
    stderr: Tensor
    matvecs: int
    probes: int = 0


@dataclass(frozen=True)
class DensityResult:
    """A spectral density: ``density`` on ``grid`` integrates to one; ``nodes`` and
    ``weights`` are the Gauss quadrature it was smoothed from, one row per probe; ``stderr``
    is the density's pointwise standard error over the probes (NaN with a single probe);
    ``dim`` the operator's size ``n`` (what turns the quadrature's mass into eigenvalue counts)."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    matvecs: int
    sigma: float = 0.0
    stderr: Tensor | None = None
    dim: int | None = None

    def _n(self) -> int:
        if self.dim is None:
            from ..errors import ArgumentError

            raise ArgumentError("this DensityResult does not know the operator's size; counts need it: "
                                "build it with ck.spectral_density (which records dim)")
        return self.dim

    def count_above(self, t: float) -> float:
        r"""The estimated number of eigenvalues above ``t``: ``n`` times the quadrature mass of
        the nodes above ``t``, averaged over the probes (unbiased for ``#{lambda_i > t}`` up to the
        quadrature's resolution: a node stands for the eigenvalues near it). Its standard error is
        :meth:`count_above_stderr`. Free (no product).

        Example:
            >>> import torch, curvkit as ck
            >>> A = torch.diag(torch.cat([torch.linspace(0, 1, 300), torch.tensor([5.0, 8.0])])).double()
            >>> r = ck.spectral_density(A, iterations=60, probes=20, seed=0)
            >>> 0.5 < r.count_above(2.0) < 4                 # two outliers (of 302)
            True
        """
        per_probe = (self.weights * (self.nodes > float(t))).sum(1)
        return float(self._n() * per_probe.mean())

    def count_above_stderr(self, t: float) -> float:
        """The standard error of :meth:`count_above`: the spread over the probes (NaN with one
        probe) combined with the quadrature's resolution at ``t``, ``n`` times a quarter of the
        weights of the two nodes around ``t`` (per probe, averaged). The true mass above ``t`` lies
        within those two nodes' weights of the count (Chebyshev-Markov-Stieltjes), and the nodes
        sit at nearly the same places in every probe, so that error does not average out over
        probes and the spread alone understates it inside the bulk. Free."""
        per_probe = (self.weights * (self.nodes > float(t))).sum(1)
        p = per_probe.shape[0]
        if p < 2:
            return math.nan
        live = self.weights > 0
        below, above = live & (self.nodes <= float(t)), live & (self.nodes > float(t))
        lo = torch.where(below, self.nodes, torch.full_like(self.nodes, -math.inf)).argmax(1, keepdim=True)
        hi = torch.where(above, -self.nodes, torch.full_like(self.nodes, -math.inf)).argmax(1, keepdim=True)
        near = self.weights.gather(1, lo)[:, 0] * below.any(1) + self.weights.gather(1, hi)[:, 0] * above.any(1)
        spread = float(per_probe.std(correction=1)) / math.sqrt(p)
        resolution = float(near.mean()) / 4
        return float(self._n() * math.hypot(spread, resolution))

    def bulk_edge(self, min_count: float = 10.0) -> float:
        r"""The upper edge of the bulk of the spectrum: in each probe, the largest quadrature node
        that stands for at least ``min_count`` eigenvalues (``n * weight >= min_count``); the
        median over the probes. An isolated eigenvalue (an outlier) gets the weight
        ``(u^T v)^2``, ``chi^2_1 / n`` for a random probe ``v``, so its node stands for about one
        eigenvalue (10 or more with probability 0.16%, and the median over probes removes such
        draws); nodes inside the continuous bulk stand for about ``n / iterations`` each. The
        estimate lies at or slightly below the true edge (a Gauss node near an edge carries less
        mass), more so for small ``n``; a probe without such a node (``n`` below about
        ``min_count * iterations``) contributes its smallest node (no bulk: every eigenvalue is
        isolated). Free (no product).

        Example:
            >>> import torch, curvkit as ck
            >>> A = torch.diag(torch.cat([torch.linspace(0, 1, 2000), torch.tensor([5.0, 8.0])])).double()
            >>> e = ck.spectral_density(A, iterations=60, probes=8, seed=0).bulk_edge()
            >>> 0.8 < e <= 1.0
            True
        """
        n = self._n()
        edges = []
        for nodes, w in zip(self.nodes, self.weights):
            heavy = nodes[(w * n >= min_count) & (w > 0)]
            edges.append(float(heavy.max()) if len(heavy) else float(nodes[w > 0].min() if (w > 0).any() else nodes.min()))
        return float(torch.tensor(edges, dtype=torch.float64).median())


@dataclass(frozen=True)
class SolveResult:
    """A solution of ``(A + damping I) x = b`` with its relative residual norm."""

    x: Tensor
    residual: float
    matvecs: int
    converged: bool
    iterations: int = 0


@dataclass(frozen=True)
class BlockResults:
    """One result per parameter block (``by="layer"`` or ``by="param"``), in operator order."""

    blocks: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.blocks[name]

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def items(self):
        return self.blocks.items()

    @property
    def matvecs(self) -> int:
        return sum(r.matvecs for r in self.blocks.values())
