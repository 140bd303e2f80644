"""Influence functions: which training examples made this prediction.

``from curvkit import influence``; every estimator has the same interface
(:class:`~curvkit.influence.base.Influence`): ``.fit()``, ``.scores(query_data)`` (``(n_query,
n_train)``, streamed to a ``.npy`` memmap with ``out=``), ``.self_influence()``, ``.top(query, k)``.
Score convention: ``score(q, i) = grad_q^T (H + damping I)^{-1} grad_i``; positive means
upweighting training example ``i`` lowers the query's loss (helpful), negative harmful.

- :class:`EKFAC`: eigenvalue-corrected K-FAC (Linear, Conv2d, Embedding, norm affine);
- :class:`Exact`: dense inverse of the GGN or Hessian (the reference on small models);
- :class:`CG`: conjugate gradient on the damped GGN or Hessian, convergence reported;
- :class:`LiSSA`: the Neumann-series recursion;
- :class:`TracIn`: learning-rate-weighted gradient dot products over checkpoints;
- :class:`Identity`: plain gradient dot products.
"""

from .base import Influence, TopResult
from .ekfac import EKFAC
from .estimators import CG, Exact, Identity, LiSSA, TracIn

__all__ = ["Influence", "TopResult", "EKFAC", "Exact", "CG", "LiSSA", "TracIn", "Identity"]
