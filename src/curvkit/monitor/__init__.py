"""Curvature during training: :class:`CurvatureMonitor` for any loop (Lightning and the HF Trainer
adapters in :mod:`curvkit.integrations` are thin wrappers over it)."""

from .monitor import QUANTITIES, BudgetWarning, CurvatureMonitor, Record
from .preconditioner import Preconditioner, adam_threshold, preconditioner, sgd_threshold

__all__ = ["CurvatureMonitor", "Record", "BudgetWarning", "QUANTITIES", "Preconditioner", "preconditioner",
           "adam_threshold", "sgd_threshold"]
