"""AdaHessian (Yao et al. 2021): Adam with the squared gradient replaced by a Hutchinson
estimate of the squared Hessian diagonal."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._base import state_dtype, use_foreach
from ._diag import DiagonalOptimizer, check_hyper


def spatial_average(d: Tensor) -> Tensor:
    """``|d|`` averaged over a conv kernel's spatial dims (all dims after the first two), as in
    Yao et al.: one curvature per (out, in) channel pair, less noisy than per weight. Other
    tensors are returned as given. Cost: no products."""
    if d.dim() <= 2:
        return d
    return d.abs().mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)


def adahessian_update(
    params: list[Tensor],
    grads: list[Tensor],
    diags: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_hessian_diag_sqs: list[Tensor],
    steps: list[int],
    hessian_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    foreach: bool | None = None,
) -> None:
    r"""The functional AdaHessian update, in place on ``params`` and the state lists.

    ``m = b1 m + (1 - b1) g``; when ``diags`` is given (a refresh step) ``v = b2 v + (1 - b2) D^2``
    with ``D`` the spatially averaged diagonal; then
    ``p -= lr * (m / (1 - b1^t) / ((sqrt(v) / sqrt(1 - b2^s))^k + eps) + weight_decay * p)``,
    ``t`` the step, ``s`` the number of refreshes, ``k`` the Hessian power. Weight decay is
    decoupled (not in ``m``). State and arithmetic in ``state_dtype`` (float32 for bf16), the
    result written back in the parameter's dtype. ``steps``/``hessian_steps`` are the counts
    after this step. ``foreach`` (default: on CUDA) runs the update as a few multi-tensor kernels
    instead of several per parameter. Cost: no products (the diagonal is given).
    """
    if use_foreach(foreach, params, exp_avgs, exp_hessian_diag_sqs):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        if diags is not None:
            D = [spatial_average(d) for d in diags]
            torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
            torch._foreach_addcmul_(exp_hessian_diag_sqs, D, D, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_hessian_diag_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in hessian_steps])
        if hessian_power != 1:
            torch._foreach_pow_(denom, hessian_power)
        torch._foreach_add_(denom, eps)
        upd = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
        torch._foreach_div_(upd, denom)
        if weight_decay:
            torch._foreach_add_(upd, params, alpha=weight_decay)
        torch._foreach_add_(params, upd, alpha=-lr)
        return
    for i, p in enumerate(params):
        x = p.to(exp_avgs[i].dtype)
        exp_avgs[i].mul_(beta1).add_(grads[i].to(x.dtype), alpha=1 - beta1)
        if diags is not None:
            D = spatial_average(diags[i])
            exp_hessian_diag_sqs[i].mul_(beta2).addcmul_(D, D, value=1 - beta2)
        bc1 = 1 - beta1 ** steps[i]
        bc2 = 1 - beta2 ** hessian_steps[i]
        denom = (exp_hessian_diag_sqs[i].sqrt() / math.sqrt(bc2)).pow(hessian_power).add_(eps)
        x = x - lr * (exp_avgs[i] / bc1 / denom + weight_decay * x)
        p.copy_(x)


class AdaHessian(DiagonalOptimizer):
    r"""AdaHessian (Yao et al., AAAI 2021) as a ``torch.optim.Optimizer``.

    Adam's second moment is the EMA of the squared Hutchinson Hessian diagonal (Rademacher
    probes, the same samples as ``ck.diagonal``), spatially averaged over conv kernels, raised to
    ``hessian_power``; decoupled weight decay; the diagonal refreshed every ``update_each`` steps
    and its EMA left unchanged in between.

    Use ``loss = opt.step(closure)``: the closure does the forward pass and returns the loss; do
    NOT call ``backward`` in it — the optimizer does (with ``create_graph=True`` on refresh steps).

    >>> import torch
    >>> from curvkit.optim import AdaHessian
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]])
    >>> opt = AdaHessian(model.parameters(), lr=0.15, update_each=2, seed=0)
    >>> first = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> for _ in range(50):
    ...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> bool(loss < first / 10)
    True

    Cost per step: one forward and one backward pass; on refresh steps also ``probes``
    Hessian-vector products (double backward, about 2 gradients each) — with ``update_each=1``
    about 3x an Adam step, with ``update_each=10`` about 1.2x.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        seed: int | None = 0,
        foreach: bool | None = None,
    ):
        check_hyper(lr, betas, eps, weight_decay, update_each)
        if not isinstance(hessian_power, (int, float)) or not 0.0 <= hessian_power <= 1.0:
            raise ArgumentError(f"hessian_power must be in [0, 1] (1: full Newton scaling, 0: none), got {hessian_power!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hessian_power=hessian_power, update_each=update_each, foreach=foreach)
        super().__init__(params, defaults, seed)

    def _estimator(self) -> str:
        return "hutchinson"

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor], diags: list[Tensor] | None) -> None:
        steps, hsteps = [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"], st["hessian_step"] = 0, 0
                st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p))
                st["exp_hessian_diag_sq"] = torch.zeros_like(p, dtype=state_dtype(p))
            st["step"] += 1
            st["hessian_step"] += diags is not None
            steps.append(st["step"])
            hsteps.append(st["hessian_step"])
        b1, b2 = group["betas"]
        adahessian_update(
            params, grads, diags,
            [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_hessian_diag_sq"] for p in params],
            steps, hsteps, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
            weight_decay=group["weight_decay"], hessian_power=group["hessian_power"], foreach=group.get("foreach"),
        )
