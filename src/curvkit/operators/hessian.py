"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jvp, vmap

from ..errors import ArgumentError
from ..model.params import ParamSpec
from ..model.risk import Mode
from .base import CurvatureOperator, transform_failed

Method = Literal["auto", "forward-over-reverse", "double-backward"]


class HessianOperator(CurvatureOperator):
    r"""``H = d^2 L / d theta^2`` of the loss ``L`` over all the data.

    Products are Hessian-vector products, by forward-over-reverse differentiation
    (``jvp`` of ``grad``, ``torch.func``) vmapped over the k probes, so the forward and backward
    pass that all probes share run once. Models that ``vmap`` cannot batch fall back to one
    probe at a time, and models without forward-mode derivatives to double backward; every
    path gives the same matrix. ``method`` forces one; :attr:`strategy` says which ran.

    Cost of ``H @ V`` with V (n, k): one pass over the data, each batch a forward, a backward
    and their k tangent passes (about 2-4 gradients for k = 1; see BENCHMARKS.md).

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = ck.hessian(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> H.shape
        (8, 8)
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 method: Method = "auto", mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, distributed: bool | None = None, cuda_graphs: bool | None = None):
        if method not in ("auto", "forward-over-reverse", "double-backward"):
            raise ArgumentError(f"method must be 'auto', 'forward-over-reverse' or 'double-backward', got {method!r}")
        self.method = method
        self.strategy = "double-backward" if method == "double-backward" else "vmap"
        super().__init__(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs)

    def _options(self) -> dict:
        return {**super()._options(), "method": self.method}

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor, Any]:
        names, k, risk = self.param_names, V[0].shape[0], self.risk
        if self.strategy != "double-backward":
            f, params = risk.function(), self.space.detached()

            def loss_and_weight(q):
                out = f(q, x)
                w = risk.weight(out, y)  # (transforms return tensors only)
                return risk.loss(out, y), (w if isinstance(w, Tensor) else torch.tensor(float(w)))

            def hvp(v):
                _, hv, (loss, w) = jvp(grad_and_value(loss_and_weight, has_aux=True), (params,), (v,), has_aux=True)
                return hv, loss, w

            probes = dict(zip(names, V))
            if self.strategy == "vmap":
                try:
                    hv, loss, w = vmap(hvp, randomness="same")(probes)
                    return [hv[n] for n in names], loss[0], w[0] if isinstance(w, Tensor) else w
                except (RuntimeError, NotImplementedError) as e:
                    if not transform_failed(e):
                        raise
                    self.strategy = "loop"
            if self.strategy == "loop":
                try:
                    outs = [hvp({n: v[j] for n, v in probes.items()}) for j in range(k)]
                    return [torch.stack([o[0][n] for o in outs]) for n in names], outs[0][1], outs[0][2]
                except (RuntimeError, NotImplementedError) as e:
                    if not transform_failed(e):
                        raise
                    if self.method == "forward-over-reverse":
                        raise
                    self.strategy = "double-backward"
        return self._double_backward(x, y, V)

    def _double_backward(self, x: Any, y: Tensor, V: list[Tensor]) -> tuple[list[Tensor], Tensor, Any]:
        k = V[0].shape[0]
        with torch.enable_grad():
            params = {n: p.requires_grad_(True) for n, p in self.space.detached().items()}
            out = self.risk.function()(params, x)
            loss = self.risk.loss(out, y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            outs = [
                torch.autograd.grad(grads, list(params.values()), [v[j] for v in V], retain_graph=j < k - 1)
                for j in range(k)
            ]
        return ([torch.stack([o[i] for o in outs]) for i in range(len(V))], loss.detach(),
                self.risk.weight(out, y))


def hessian(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, method: Method = "auto",
            mode: Mode = "eval", reduction: str | None = None, output: Any = None, max_batch: int | None = None,
            distributed: bool | None = None, cuda_graphs: bool | None = None) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` over ``data`` as a matrix-free operator.

    Cost to build: one pass over the data's batches without the model (to count and check
    them) and one forward on the first batch (to check the loss). See :class:`HessianOperator`
    for the product's cost and :class:`~curvkit.operators.base.CurvatureOperator` for the options.
    """
    return HessianOperator(model, loss_fn, data, params, method=method, mode=mode, reduction=reduction,
                           output=output, max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs)
