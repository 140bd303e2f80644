"""Curvature matrices of a model as matrix-free linear operators (one module per matrix)."""

from ..linear_operator import (BlockDiagonalOperator, FunctionOperator, IdentityOperator, LinearOperator,
                               identity_like)
from .base import CurvatureOperator
from .fisher import FisherOperator, fisher
from .ggn import GGNOperator, ggn
from .hessian import HessianOperator, hessian
from .input_hessian import InputHessianOperator, input_hessian

__all__ = [
    "LinearOperator", "CurvatureOperator", "FunctionOperator", "IdentityOperator", "BlockDiagonalOperator",
    "identity_like", "HessianOperator", "GGNOperator", "FisherOperator", "hessian", "ggn", "fisher",
    "InputHessianOperator", "input_hessian",
]
