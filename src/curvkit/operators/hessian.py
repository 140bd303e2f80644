"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad_and_value, jvp, vmap

from ..errors import ArgumentError
from ._losses import forward_ad_safe
from .base import CurvatureOperator

Method = Literal["auto", "forward-over-reverse", "double-backward"]
_FALLBACK = (RuntimeError, NotImplementedError)


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

    def __init__(self, model, loss_fn, data, params=None, *, method: Method = "auto", **kw: Any):
        if method not in ("auto", "forward-over-reverse", "double-backward"):
            raise ArgumentError(f"method must be 'auto', 'forward-over-reverse' or 'double-backward', got {method!r}")
        self.method = method
        self.strategy = "double-backward" if method == "double-backward" else "vmap"
        super().__init__(model, loss_fn, data, params, **kw)

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor]:
        names, k = self.param_names, V[0].shape[0]
        if self.strategy != "double-backward":
            f, params, loss_fn = self._model_fn(), self._param_dict(), forward_ad_safe(self.loss_fn)

            def grad_with_loss(p):
                return grad_and_value(lambda q: loss_fn(f(q, x), y))(p)  # (gradient, aux=loss)

            def hvp(v):
                _, hv, loss = jvp(grad_with_loss, (params,), (v,), has_aux=True)
                return hv, loss

            probes = dict(zip(names, V))
            if self.strategy == "vmap":
                try:
                    hv, loss = vmap(hvp)(probes)
                    return [hv[n] for n in names], loss[0]
                except _FALLBACK:
                    self.strategy = "loop"
            if self.strategy == "loop":
                try:
                    outs = [hvp({n: v[j] for n, v in probes.items()}) for j in range(k)]
                    return [torch.stack([o[0][n] for o in outs]) for n in names], outs[0][1]
                except _FALLBACK:
                    if self.method == "forward-over-reverse":
                        raise
                    self.strategy = "double-backward"
        return self._double_backward(x, y, V)

    def _double_backward(self, x: Any, y: Tensor, V: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        k = V[0].shape[0]
        with torch.enable_grad():
            params = {n: p.requires_grad_(True) for n, p in self._param_dict().items()}
            loss = self.loss_fn(self._model_fn()(params, x), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            outs = [
                torch.autograd.grad(grads, list(params.values()), [v[j] for v in V], retain_graph=j < k - 1)
                for j in range(k)
            ]
        return [torch.stack([o[i] for o in outs]) for i in range(len(V))], loss.detach()


def hessian(model, loss_fn, data, params=None, **kw: Any) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` over ``data`` as a matrix-free operator.

    Cost to build: one pass over the data's batches without the model (to count and check
    them) and one forward on the first batch (to check the loss). See :class:`HessianOperator`.
    """
    return HessianOperator(model, loss_fn, data, params, **kw)
