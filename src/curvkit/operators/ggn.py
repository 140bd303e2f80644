"""The generalized Gauss-Newton matrix ``J^T H_loss J``, and the base it shares with the Fisher."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from ..errors import LossError, ModelError
from ..model.losses import warn_if_linear
from ..model.params import ParamSpec
from ..model.risk import Mode, output_hint
from .base import CurvatureOperator, transform_failed


class OutputSpaceOperator(CurvatureOperator):
    """``J^T M J`` summed over batches, for an output-space matrix ``M`` given by the subclass.

    ``J`` is the Jacobian of the model's outputs with respect to the parameters. A product runs,
    per batch, a forward with ``vjp``, ``J V`` for all k probes by a vmapped ``jvp`` (a second
    forward carrying k tangents), ``M (J V)`` in output space, and ``J^T`` of it by a vmapped
    backward.
    """

    _what = "the GGN"

    def _setup(self) -> None:
        x, y = self.data.first()
        with self.risk.in_mode(), torch.no_grad():
            out = self.risk.function()(self.space.detached(), x)
        if not isinstance(out, Tensor):
            raise LossError(
                f"the model returned {type(out).__name__}; {self._what} needs a single output tensor"
                f"{output_hint(out) or '; pass output= (a key, an index or a callable) to pick it'}"
            )
        self._check_loss(out, y)
        self._vmap = True

    def _check_loss(self, out: Tensor, y: Tensor) -> None:
        warn_if_linear(self.loss, out, y, self._what)

    def _output_matmat(self, out: Tensor, y: Tensor, JV: Tensor, index: int) -> Tensor:
        raise NotImplementedError

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor, Any]:
        names, f, params = self.param_names, self.risk.function(), self.space.detached()

        def fx(p):
            return f(p, x)

        try:
            out, vjp_fn = vjp(fx, params)
        except (RuntimeError, NotImplementedError) as e:
            if not transform_failed(e):
                raise
            raise ModelError(
                f"torch.func cannot differentiate the model ({e}); the GGN and the Fisher need "
                "torch.func.vjp/jvp of the model. Port custom autograd.Functions to the "
                "setup_context style (see torch.func docs), or use ck.hessian, which falls back "
                "to double backward"
            ) from e
        out = out.detach()
        probes = dict(zip(names, V))
        k = V[0].shape[0]
        if self._vmap:
            try:
                JV = vmap(lambda v: jvp(fx, (params,), (v,))[1])(probes)
            except (RuntimeError, NotImplementedError) as e:
                if not transform_failed(e):
                    raise
                self._vmap = False
        if not self._vmap:
            JV = torch.stack([jvp(fx, (params,), ({n: v[j] for n, v in probes.items()},))[1] for j in range(k)])
        MJV = self._output_matmat(out, y, JV, index)
        if self._vmap:
            (prods,) = vmap(vjp_fn)(MJV)
        else:
            rows = [vjp_fn(MJV[j])[0] for j in range(k)]
            prods = {n: torch.stack([r[n] for r in rows]) for n in names}
        return [prods[n] for n in names], self.risk.loss(out, y), self.risk.weight(out, y)


class GGNOperator(OutputSpaceOperator):
    r"""The generalized Gauss-Newton matrix ``G = sum_b w_b J_b^T H_loss,b J_b``.

    ``H_loss`` is the Hessian of the loss with respect to the model's outputs: closed form for
    cross-entropy (``diag(p) - p p^T`` per position), squared error (``2 I``) and BCE with
    logits (``diag(s(1-s))``), however they are spelled (:mod:`curvkit.model.losses`); autograd
    for any other loss. G is symmetric, and positive semi-definite whenever the loss is convex
    in the outputs (all three above). A loss linear in the outputs (NLL after an in-model
    ``log_softmax``) has a zero GGN: that draws a warning saying how to split model and loss.

    Cost of ``G @ V`` with V (n, k): one pass over the data, each batch two forwards (one
    carrying k tangents) and one backward carrying k cotangents.

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2)
        >>> G = ck.ggn(model, torch.nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 2)))
        >>> bool((G.dense() - G.dense().T).abs().max() < 1e-6)
        True
    """

    def _output_matmat(self, out: Tensor, y: Tensor, JV: Tensor, index: int) -> Tensor:
        return self.loss.hessian_matmat(out, y, JV)


def ggn(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, mode: Mode = "eval",
        reduction: str | None = None, output: Any = None, max_batch: int | None = None,
        distributed: bool | None = None, cuda_graphs: bool | None = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix of ``loss_fn(model(inputs), targets)`` over ``data``.

    Cost to build: one pass over the batches without the model and two forwards on the first
    batch. See :class:`GGNOperator` and, for the options, :class:`~curvkit.operators.base.CurvatureOperator`.
    """
    return GGNOperator(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                       max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs)
