"""curvkit: curvature of PyTorch models without forming a matrix, and what to do with it."""

from . import errors
from .analyze import analyze
from .approx import kfac
from .errors import CurvkitError
from .linalg import diagonal, eigenvalues, power_iteration, solve, spectral_density, trace
from .operators import fisher, ggn, hessian, identity_like

__version__ = "0.1.0"

__all__ = [
    "hessian", "ggn", "fisher", "identity_like", "kfac",
    "eigenvalues", "trace", "diagonal", "spectral_density", "solve", "power_iteration",
    "analyze",
    "errors", "CurvkitError", "__version__",
]
