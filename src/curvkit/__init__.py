"""curvkit: curvature of PyTorch models without forming a matrix, and what to do with it."""

from . import errors
from .analyze import analyze
from .approx import kfac
from .errors import CurvkitError
from .linalg import (diagonal, eigenvalues, grad_overlap, inverse, outliers, power_iteration, solve,
                     spectral_density, trace)
from .linear_operator import identity_like
from .model import per_example_gradients
from .operators import fisher, ggn, hessian, input_hessian
from .taylor import biharmonic, diffusion, laplacian

__version__ = "0.1.0"

__all__ = [
    "hessian", "ggn", "fisher", "identity_like", "kfac", "per_example_gradients",
    "eigenvalues", "trace", "diagonal", "spectral_density", "solve", "inverse", "power_iteration",
    "outliers", "grad_overlap",
    "analyze", "input_hessian", "laplacian", "diffusion", "biharmonic",
    "errors", "CurvkitError", "__version__",
]
