"""Sophia (Liu et al. 2023): momentum preconditioned by an occasionally refreshed Hessian
diagonal, with the per-coordinate step clipped."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._base import state_dtype, use_foreach
from ._diag import DiagonalOptimizer, check_hyper


def sophia_update(
    params: list[Tensor],
    grads: list[Tensor],
    diags: list[Tensor] | None,
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    foreach: bool | None = None,
) -> None:
    r"""The functional Sophia update, in place on ``params`` and the state lists.

    ``m = b1 m + (1 - b1) g``; when ``diags`` is given (a refresh step) ``h = b2 h + (1 - b2) d``;
    then ``p = p * (1 - lr * weight_decay) - lr * clip(m / max(gamma * h, eps), -1, 1)``.
    Weight decay is decoupled. State and arithmetic in ``state_dtype`` (float32 for bf16), the
    result written back in the parameter's dtype. ``foreach`` (default: on CUDA) runs the update
    as a few multi-tensor kernels instead of several per parameter. Cost: no products (the
    diagonal is given).
    """
    if use_foreach(foreach, params, exp_avgs, hessians):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        if diags is not None:
            torch._foreach_mul_(hessians, beta2)
            torch._foreach_add_(hessians, diags, alpha=1 - beta2)
        denom = torch._foreach_mul(hessians, gamma)
        torch._foreach_clamp_min_(denom, eps)
        ratio = torch._foreach_div(exp_avgs, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, ratio, alpha=-lr)
        return
    for i, p in enumerate(params):
        x = p.to(exp_avgs[i].dtype)
        exp_avgs[i].mul_(beta1).add_(grads[i].to(x.dtype), alpha=1 - beta1)
        if diags is not None:
            hessians[i].mul_(beta2).add_(diags[i], alpha=1 - beta2)
        ratio = (exp_avgs[i] / (gamma * hessians[i]).clamp_min(eps)).clamp(-1.0, 1.0)
        p.copy_(x * (1 - lr * weight_decay) - lr * ratio)


class Sophia(DiagonalOptimizer):
    r"""Sophia (Liu et al., ICLR 2024) as a ``torch.optim.Optimizer``.

    Update ``clip(m / max(gamma * h, eps), 1)`` with ``m`` the gradient EMA and ``h`` the EMA of
    a Hessian-diagonal estimate refreshed every ``update_each`` steps (unchanged in between),
    and decoupled weight decay. Two estimators:

    - ``estimator="hutchinson"`` (Sophia-H): ``z * (H z)`` with a Rademacher ``z``, the same
      samples as ``ck.diagonal``. The closure returns the loss.
    - ``estimator="gnb"`` (Sophia-G, Gauss-Newton-Bartlett): the closure returns
      ``(loss, logits)``, ``logits`` of shape ``(..., num_classes)`` from the same forward pass.
      On refresh steps the optimizer samples labels from ``softmax(logits)`` with its own seeded
      generator, takes the gradient ``g_hat`` of the mean cross-entropy against them and uses
      ``B * g_hat**2`` (``B`` = number of logit rows). It assumes the loss is a classification
      loss on those logits (cross-entropy, language modelling).

    For either, a closure may return ``(loss, logits)`` (the Hutchinson estimator ignores the
    logits), so one closure serves both. Do NOT call ``backward`` in the closure.

    >>> import torch
    >>> from curvkit.optim import Sophia
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(8, 3)
    >>> x = torch.randn(128, 8); y = (x[:, :3]).argmax(1)
    >>> def closure():
    ...     logits = model(x)
    ...     return torch.nn.functional.cross_entropy(logits, y), logits
    >>> opt = Sophia(model.parameters(), lr=0.05, estimator="gnb", update_each=5, seed=0)
    >>> first = opt.step(closure)
    >>> for _ in range(40):
    ...     loss = opt.step(closure)
    >>> bool(loss < first / 2)
    True

    Cost per step: one forward and one backward pass; every ``update_each`` steps also one
    Hessian-vector product (Hutchinson: a double backward, about 2 gradients) or one extra
    backward pass (GNB). With the default ``update_each=10`` about 1.1-1.2x an AdamW step.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        eps: float = 1e-12,
        weight_decay: float = 0.1,
        update_each: int = 10,
        estimator: str = "hutchinson",
        seed: int | None = 0,
        foreach: bool | None = None,
    ):
        check_hyper(lr, betas, eps, weight_decay, update_each)
        if not isinstance(gamma, (int, float)) or not 0.0 < gamma < float("inf"):
            raise ArgumentError(f"gamma must be a finite number > 0 (the paper uses 0.01-0.05), got {gamma!r}")
        if estimator not in ("hutchinson", "gnb"):
            raise ArgumentError(f"estimator must be 'hutchinson' (Sophia-H) or 'gnb' (Sophia-G), got {estimator!r}")
        self.estimator = estimator
        defaults = dict(lr=lr, betas=tuple(betas), gamma=gamma, eps=eps, weight_decay=weight_decay,
                        update_each=update_each, foreach=foreach)
        super().__init__(params, defaults, seed)

    def _estimator(self) -> str:
        return self.estimator

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor], diags: list[Tensor] | None) -> None:
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p))
                st["hessian"] = torch.zeros_like(p, dtype=state_dtype(p))
            st["step"] += 1
        b1, b2 = group["betas"]
        sophia_update(
            params, grads, diags,
            [self.state[p]["exp_avg"] for p in params], [self.state[p]["hessian"] for p in params],
            lr=group["lr"], beta1=b1, beta2=b2, gamma=group["gamma"], eps=group["eps"],
            weight_decay=group["weight_decay"], foreach=group.get("foreach"),
        )
