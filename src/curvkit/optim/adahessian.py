"""AdaHessian (Yao et al. 2021): Adam with the squared gradient replaced by a Hutchinson
estimate of the squared Hessian diagonal."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._base import renamed, state_dtype
from ._diag import DiagonalOptimizer, check_hyper
from ._moments import adam_denominator, bias_corrected, decoupled_update, ema_, ema_sq_, tensor_batches


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
    ``p = p (1 - lr weight_decay) - lr * m / (1 - b1^t) / ((sqrt(v) / sqrt(1 - b2^s))^k + eps)``,
    ``t`` the step, ``s`` the number of refreshes, ``k`` the Hessian power (Adam's moments and
    denominator, :mod:`curvkit.optim._moments`). Weight decay is decoupled (not in ``m``). State
    and arithmetic in ``state_dtype`` (float32 for bf16), the result written back in the
    parameter's dtype. ``steps``/``hessian_steps`` are the counts after this step. ``foreach``
    (default: on CUDA) runs the update as a few multi-tensor kernels rather than a few per
    parameter (the same arithmetic). Cost: no products (the diagonal is given).
    """
    for idx in tensor_batches(foreach, params, exp_avgs, exp_hessian_diag_sqs):
        m, v = [exp_avgs[i] for i in idx], [exp_hessian_diag_sqs[i] for i in idx]
        ema_(m, [grads[i].to(m[k].dtype) for k, i in enumerate(idx)], beta1)
        if diags is not None:
            ema_sq_(v, [spatial_average(diags[i]) for i in idx], beta2)
        denom = adam_denominator(v, [hessian_steps[i] for i in idx], beta2, eps, power=hessian_power)
        d = torch._foreach_div(bias_corrected(m, [steps[i] for i in idx], beta1), denom)
        decoupled_update([params[i] for i in idx], d, lr, weight_decay)


class AdaHessian(DiagonalOptimizer):
    r"""AdaHessian (Yao et al., AAAI 2021) as a ``torch.optim.Optimizer``.

    Adam's second moment is the EMA of the squared Hutchinson Hessian diagonal (Rademacher
    probes, the same samples as ``ck.diagonal``), spatially averaged over conv kernels, raised to
    ``hessian_power``; decoupled weight decay; the diagonal refreshed every ``every`` steps
    and its EMA left unchanged in between (``update_each`` is the deprecated name of ``every``).

    Drive it with torch's loop, ``loss.backward(create_graph=True); opt.step()`` (the
    Hessian-vector products go through the graph kept in ``p.grad``; a refresh step without it
    raises ModelError saying so), or with ``loss = opt.step(closure)``, the closure doing the
    forward pass and returning the loss without calling ``backward``: the optimizer
    differentiates it, with ``create_graph=True`` only on refresh steps, which is cheaper. A
    closure that calls ``backward`` itself (torch's convention) works as the torch loop does.

    >>> import torch
    >>> from curvkit.optim import AdaHessian
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]])
    >>> opt = AdaHessian(model.parameters(), lr=0.15, every=2, seed=0)
    >>> first = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> for _ in range(50):
    ...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> bool(loss < first / 10)
    True

    Cost per step: one forward and one backward pass; on refresh steps also ``probes``
    Hessian-vector products (double backward, about 2 gradients each) -- with ``every=1``
    about 3x an Adam step, with ``every=10`` about 1.2x. In torch's loop every backward keeps
    its graph (``create_graph=True``), which costs memory on the steps between refreshes too.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        every: int = 1,
        seed: int | torch.Generator | None = 0,
        foreach: bool | None = None,
        update_each: int | None = None,
    ):
        every = renamed("AdaHessian", "every", every, 1, "update_each", update_each)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, hessian_power=hessian_power, every=every, foreach=foreach)
        super().__init__(params, defaults, seed)

    @staticmethod
    def _check_group(g: dict) -> None:
        check_hyper(g)
        hp = g["hessian_power"]
        if not isinstance(hp, (int, float)) or isinstance(hp, bool) or not 0.0 <= hp <= 1.0:
            raise ArgumentError(f"hessian_power must be in [0, 1] (1: full Newton scaling, 0: none), got {hp!r}")

    def _estimator(self, group: dict) -> str:
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
            weight_decay=group["weight_decay"], hessian_power=group["hessian_power"], foreach=group["foreach"],
        )
