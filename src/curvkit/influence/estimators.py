"""Influence estimators that differ only in how ``(H + damping I)^{-1}`` is applied: none
(:class:`Identity`, :class:`TracIn`), dense (:class:`Exact`), conjugate gradient (:class:`CG`)
and the LiSSA recursion (:class:`LiSSA`). :class:`~curvkit.influence.EKFAC` is in its own module."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ConvergenceWarning, NonFiniteError
from ..linalg import eigenvalues, solve
from ..linalg.results import SolveResult
from ..model.params import ParamSpec
from ..model.risk import Mode
from ..operators import ggn, hessian
from .base import Influence, Measurement

Curvature = Literal["ggn", "hessian"]


class Identity(Influence):
    """Plain gradient similarity ``grad_q^T grad_i`` (``H = I``, no damping): the baseline
    every influence paper reports. Nothing to fit."""

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 measurement: Measurement | None = None, mode: Mode = "eval", reduction: str | None = None,
                 output: Any = None, max_batch: int | None = None):
        super().__init__(model, loss_fn, train_data, params, damping=0.0, measurement=measurement, mode=mode,
                         reduction=reduction, output=output, max_batch=max_batch)

    def _precondition(self, Q: Tensor) -> Tensor:
        return Q.to(self._work_dtype())


class TracIn(Influence):
    r"""TracIn (Pruthi et al. 2020): ``score(q, i) = sum_c lr_c grad_q(theta_c)^T grad_i(theta_c)``
    over the given checkpoints (state dicts of ``model``; ``lr`` one number or one per checkpoint).
    Positive: training on ``i`` at those checkpoints lowered the query's loss (helpful), as for
    the other estimators. The model's own weights are restored after every use.

    Cost: the :class:`Identity` cost once per checkpoint (a ``load_state_dict`` each).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, checkpoints: Sequence[dict],
                 params: ParamSpec = None, *, lr: float | Sequence[float] = 1.0,
                 measurement: Measurement | None = None, mode: Mode = "eval", reduction: str | None = None,
                 output: Any = None, max_batch: int | None = None):
        super().__init__(model, loss_fn, train_data, params, damping=0.0, measurement=measurement, mode=mode,
                         reduction=reduction, output=output, max_batch=max_batch)
        checkpoints = list(checkpoints)
        if not checkpoints or not all(isinstance(c, dict) for c in checkpoints):
            raise ArgumentError("checkpoints must be a non-empty list of state dicts (model.state_dict() "
                                "copies saved during training)")
        lrs = [float(lr)] * len(checkpoints) if isinstance(lr, (int, float)) else [float(v) for v in lr]
        if len(lrs) != len(checkpoints) or not all(math.isfinite(v) for v in lrs):
            raise ArgumentError(f"lr must be one finite number or one per checkpoint ({len(checkpoints)}), got {lr!r}")
        keys = set(model.state_dict())
        for j, c in enumerate(checkpoints):
            if set(c) != keys:
                missing = sorted(keys - set(c))[:4]
                raise ArgumentError(f"checkpoint {j} is not a state dict of this model (keys differ, e.g. "
                                    f"missing {missing}); pass model.state_dict() copies")
        self.checkpoints, self.lrs = checkpoints, lrs

    def _precondition(self, Q: Tensor) -> Tensor:
        return Q.to(self._work_dtype())

    def _stages(self) -> Iterator[float]:
        model = self.model
        saved = copy.deepcopy(model.state_dict())
        try:
            for ckpt, lr in zip(self.checkpoints, self.lrs):
                model.load_state_dict(ckpt)
                yield lr
        finally:
            model.load_state_dict(saved)


class _CurvatureInfluence(Influence):
    """An estimator built on a curvature operator (the GGN or the Hessian of the mean training loss)."""

    def __init__(self, model, loss_fn, train_data, params, *, damping, curvature, measurement, mode,
                 reduction, output, max_batch, distributed=False):
        super().__init__(model, loss_fn, train_data, params, damping=damping, measurement=measurement, mode=mode,
                         reduction=reduction, output=output, max_batch=max_batch, distributed=distributed)
        if curvature not in ("ggn", "hessian"):
            raise ArgumentError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        self.curvature = curvature

    def operator(self):
        """The curvature operator (``ck.ggn`` or ``ck.hessian``) over the training data."""
        r = self.risk
        build = ggn if self.curvature == "ggn" else hessian
        return build(r.model, r.spec, r.batches, r.space.names, **self._options())


class Exact(_CurvatureInfluence):
    r"""The reference: ``(H + damping I)^{-1}`` from the dense GGN or Hessian (``curvature=``)
    and its eigendecomposition, for small models.

    ``fit`` refuses a matrix ``H + damping I`` that is singular or indefinite (a smallest
    eigenvalue at or below ``n * eps * ||H||``) and says how much damping it needs.
    ``.eigenvalues`` holds ``H``'s spectrum (ascending).

    Cost: ``n`` curvature products (each one pass over the data) and one ``eigh`` (``O(n^3)``);
    memory ``2 n^2`` numbers (refused above ``max_size`` parameters).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 damping: float = 1e-3, curvature: Curvature = "ggn", measurement: Measurement | None = None,
                 mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, max_size: int = 4096):
        super().__init__(model, loss_fn, train_data, params, damping=damping, curvature=curvature,
                         measurement=measurement, mode=mode, reduction=reduction, output=output, max_batch=max_batch)
        self.max_size = max_size

    def _fit(self) -> None:
        H = self.operator().dense(max_size=self.max_size).to(self._work_dtype())
        w, V = torch.linalg.eigh(0.5 * (H + H.T))
        lam = w + self.damping
        tol = H.shape[0] * torch.finfo(H.dtype).eps * max(float(w.abs().max()), 1e-300)
        if float(lam.min()) <= tol:
            need = max(-float(w.min()), 0.0) + 1e-3 * max(float(w.abs().max()), 1.0)
            raise ArgumentError(
                f"H + damping I is singular or indefinite: the {self.curvature}'s smallest eigenvalue is "
                f"{float(w.min()):.3e} and damping={self.damping:g}, so the inverse does not exist. Pass "
                f"damping > {max(-float(w.min()), 0.0):.3e} (e.g. damping={need:.1e})"
                + (", or use curvature='ggn' (positive semi-definite)" if self.curvature == "hessian" else ""))
        self.eigenvalues = w
        self._inv = (V / lam) @ V.T

    def _precondition(self, Q: Tensor) -> Tensor:
        return Q.to(self._inv.dtype) @ self._inv


class CG(_CurvatureInfluence):
    r"""``(H + damping I)^{-1} g`` by conjugate gradient (:func:`curvkit.solve`) on the damped GGN or
    Hessian, one block solve per query batch (each column its own CG).

    ``.solves`` lists every :class:`~curvkit.linalg.results.SolveResult` (``converged``,
    ``residual``, ``matvecs``); a solve that does not reach ``tol`` warns
    (:class:`~curvkit.errors.ConvergenceWarning`). ``self_influence`` costs one solve per
    training example (batched per training batch).

    Cost: per solved block of ``k`` gradients, up to ``max_matvecs`` curvature products (each one
    pass over the training data, ``k`` probes at once).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 damping: float = 1e-3, curvature: Curvature = "ggn", tol: float = 1e-6,
                 max_matvecs: int | None = None, measurement: Measurement | None = None, mode: Mode = "eval",
                 reduction: str | None = None, output: Any = None, max_batch: int | None = None,
                 distributed: bool | None = False):
        super().__init__(model, loss_fn, train_data, params, damping=damping, curvature=curvature,
                         measurement=measurement, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed)
        self.tol, self.max_matvecs = tol, max_matvecs
        self.solves: list[SolveResult] = []

    def _fit(self) -> None:
        self._H = self.operator()

    def _precondition(self, Q: Tensor) -> Tensor:
        B = Q.to(self._H.dtype).T.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("always", ConvergenceWarning)
            res = solve(self._H, B, damping=self.damping, tol=self.tol, max_matvecs=self.max_matvecs)
        self.solves.append(res)
        return res.x.T

    @property
    def converged(self) -> bool:
        """Whether every solve so far reached ``tol``."""
        return all(r.converged for r in self.solves)


class LiSSA(_CurvatureInfluence):
    r"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017): the truncated Neumann series

        v_0 = g,   v_{j+1} = g + v_j - (H + damping I) v_j / scale,   (H + damping I)^{-1} g ~ v_J / scale

    with ``J = depth`` full-data curvature products (deterministic; the stochastic version's
    minibatch sampling only adds noise to this). It converges iff every eigenvalue of
    ``(H + damping I) / scale`` lies in ``(0, 2)``: ``H + damping I`` positive definite and
    ``scale > lambda_max(H + damping I) / 2``; the error shrinks as ``(1 - lambda_min / scale)^J``.
    ``scale=None`` takes ``1.1 (lambda_max + damping)`` from ``ck.eigenvalues`` (Lanczos) at fit.
    A diverging recursion raises :class:`~curvkit.errors.NonFiniteError`; an unconverged one
    warns. ``.convergence`` lists each solve's last relative step ``||v_J - v_{J-1}|| / ||v_J||``.

    Cost: ``depth`` curvature products per solved block (each a pass over the training data).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 damping: float = 1e-3, curvature: Curvature = "ggn", depth: int = 1000,
                 scale: float | None = None, tol: float = 1e-6, measurement: Measurement | None = None,
                 mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None):
        super().__init__(model, loss_fn, train_data, params, damping=damping, curvature=curvature,
                         measurement=measurement, mode=mode, reduction=reduction, output=output, max_batch=max_batch)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ArgumentError(f"depth must be a positive integer, got {depth!r}")
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
            raise ArgumentError(f"scale must be a finite number > 0 or None, got {scale!r}")
        self.depth, self.scale, self.tol = depth, scale, tol
        self.convergence: list[float] = []

    def _fit(self) -> None:
        self._H = self.operator()
        if self.scale is None:
            top = float(eigenvalues(self._H, k=1, tol=1e-4).values[0])
            self.scale = 1.1 * (top + self.damping)

    def _precondition(self, Q: Tensor) -> Tensor:
        G = Q.to(self._H.dtype).T.contiguous()
        V = G.clone()
        gnorm = G.norm().clamp_min(1e-300)
        step = math.inf
        with self._H.retaining():  # depth products on the same data: the Hessian keeps its gradient graphs
            for _ in range(self.depth):
                HV = self._H @ V + self.damping * V
                new = G + V - HV / self.scale
                step = float((new - V).norm() / new.norm().clamp_min(1e-300))
                V = new
                if not torch.isfinite(V).all() or float(V.norm() / gnorm) > 1e12:
                    raise NonFiniteError(
                        f"LiSSA diverged (scale={self.scale:g}, damping={self.damping:g}): an eigenvalue of "
                        "(H + damping I) / scale is outside (0, 2). Raise scale above lambda_max(H + damping I) / 2, "
                        "and damping above -lambda_min(H) (use curvature='ggn' for a positive semi-definite matrix)")
                if step <= self.tol:
                    break
        self.convergence.append(step)
        if step > self.tol:
            warnings.warn(f"LiSSA stopped at depth={self.depth} with relative step {step:.2e} > tol {self.tol:g}; "
                          "raise depth or damping (the error shrinks as (1 - lambda_min/scale)^depth)",
                          ConvergenceWarning, stacklevel=3)
        return (V / self.scale).T


__all__ = ["Identity", "TracIn", "Exact", "CG", "LiSSA"]
