"""Curvature matrices of a model as matrix-free linear operators."""

from ._data import Batches
from ._losses import loss_terms
from ._params import flatten, resolve_params, unflatten
from .base import (
    CurvatureOperator, FunctionOperator, IdentityOperator, LinearOperator, identity_like, model_mode,
)
from .fisher import FisherOperator, fisher
from .ggn import GGNOperator, ggn
from .hessian import HessianOperator, hessian

__all__ = [
    "LinearOperator", "CurvatureOperator", "FunctionOperator", "IdentityOperator", "identity_like", "model_mode",
    "HessianOperator", "GGNOperator", "FisherOperator", "hessian", "ggn", "fisher",
    "resolve_params", "flatten", "unflatten", "Batches", "loss_terms",
]
