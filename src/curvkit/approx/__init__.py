"""Structured approximations of curvature that share the operators' interface, and the matrix
functions their consumers use (:mod:`curvkit.approx.matfun`)."""

from .kfac import kfac
from .matfun import inverse_root, newton_schulz, sym_eigh

__all__ = ["kfac", "inverse_root", "newton_schulz", "sym_eigh"]
