"""Algorithms on any symmetric linear operator (``shape``, ``dtype``, ``device``, ``@``).

They know nothing of neural networks: each can be tested on a plain matrix.
"""

from .cg import InverseOperator, inverse, solve
from .density import spectral_density
from .diagonal import diagonal
from .lanczos import eigenvalues
from .outliers import OutlierResult, grad_overlap, outliers
from .power import power_iteration
from .results import BlockResults, DensityResult, DiagonalResult, EigenResult, SolveResult, TraceResult
from .trace import trace

__all__ = [
    "eigenvalues", "trace", "diagonal", "spectral_density", "solve", "inverse", "InverseOperator", "power_iteration",
    "outliers", "grad_overlap", "OutlierResult",
    "EigenResult", "TraceResult", "DiagonalResult", "DensityResult", "SolveResult", "BlockResults",
]
