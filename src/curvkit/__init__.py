"""curvkit: curvature of PyTorch models without forming a matrix, and what to do with it."""

from . import errors
from .errors import CurvkitError
from .linalg import power_iteration
from .operators import fisher, ggn, hessian, identity_like

__version__ = "0.1.0"

__all__ = ["hessian", "ggn", "fisher", "identity_like", "power_iteration", "errors", "CurvkitError", "__version__"]
