"""Structured approximations of curvature that share the operators' interface, and the matrix
functions their consumers use (:mod:`curvkit.approx.matfun`); M-FAC's sliding-window inverse
Fisher (:mod:`curvkit.approx.mfac`)."""

from .kfac import kfac
from .matfun import inverse_root, newton_schulz, sym_eigh
from .mfac import MFACOperator, mfac

__all__ = ["kfac", "inverse_root", "newton_schulz", "sym_eigh", "mfac", "MFACOperator"]
