"""Result objects of the linear-algebra algorithms.

Every result states its cost in operator products (``matvecs``: one product with one column
counts 1, a block product with k columns counts k) and how good it is (a standard error, a
residual norm, or a convergence flag).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    is the density's pointwise standard error over the probes (NaN with a single probe)."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    matvecs: int
    sigma: float = 0.0
    stderr: Tensor | None = None


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
