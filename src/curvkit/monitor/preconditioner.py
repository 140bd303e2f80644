"""The diagonal preconditioner ``P`` an optimizer applies, read from its state, and the stability
threshold of its learning rate: what the preconditioned sharpness ``lambda_max(P^-1 H)`` is
compared with (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ArgumentError

SUPPORTED = ("torch.optim.SGD (plain or with momentum)", "torch.optim.Adam", "torch.optim.AdamW",
             "curvkit.optim.AdaHessian", "curvkit.optim.Sophia")


@dataclass(frozen=True)
class Preconditioner:
    """``diagonal``: ``P`` flat over the parameters (None for the identity, SGD); ``lr`` the
    learning rate of the (first) param group; ``threshold`` the stability threshold of
    ``lambda_max(P^-1 H)`` at that rate; ``kind`` how it was read; ``momentum`` (beta or beta1)."""

    diagonal: Tensor | None
    lr: float
    threshold: float
    kind: str
    momentum: float


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The sharpness below which torch's SGD is stable on a quadratic: ``(2 + 2 beta) / lr`` for
    heavy-ball momentum ``beta`` (``2 / lr`` for plain gradient descent), divided by
    ``1 - dampening`` (the buffer sums ``(1 - dampening) g``) and, with ``nesterov=True``
    (the step ``g + beta buf``), by ``1 + 2 beta``: ``(2 + 2 beta) / ((1 + 2 beta) lr)``. Free."""
    scale = (1.0 - dampening) * (1.0 + 2.0 * momentum if nesterov else 1.0)
    return (2.0 + 2.0 * momentum) / (scale * lr)


def _sgd_group_threshold(lr: float, group: dict) -> float:
    mom = float(group.get("momentum", 0.0) or 0.0)
    damp = float(group.get("dampening", 0.0) or 0.0) if mom else 0.0  # torch ignores it without momentum
    return sgd_threshold(lr, mom, damp, bool(group.get("nesterov", False)) and mom > 0)


def adam_threshold(lr: float, beta1: float) -> float:
    """``2 (1 + beta1) / ((1 - beta1) lr)``: Adam's update with a frozen preconditioner is
    heavy-ball momentum on ``P^-1 H`` with an EMA (38 / lr for beta1 = 0.9)."""
    return 2.0 * (1.0 + beta1) / ((1.0 - beta1) * lr)


def preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Preconditioner:
    """The diagonal preconditioner of ``optimizer`` for ``params`` (flat in their order).

    Adam/AdamW: ``(1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` (``max_exp_avg_sq`` with
    amsgrad); AdaHessian: ``(1 - beta1^t) ((sqrt(v / (1 - beta2^s)))^power + eps)``. The factor
    ``1 - beta1^t`` is the first moment's bias correction: the step is ``lr P^-1 m`` with ``m`` the
    raw EMA of the gradients, the heavy-ball form whose threshold is :func:`adam_threshold`
    (Cohen et al. 2022, section 2; it matters early in training, ``1 - 0.9^10 = 0.65``). Sophia: ``max(gamma h, eps)`` (its update is this
    preconditioner until the clip acts); SGD: the identity. Param groups whose learning rate
    differs from the first group's (``lr``) multiply their part of ``P`` by ``lr / lr_group``. Parameters that the optimizer has no
    state for yet (before its first step) raise ArgumentError. Free (reads the state).
    """
    from ..optim import AdaHessian, Sophia  # the optimizers are consumers too: imported where used

    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in groups]
    if missing:
        raise ArgumentError(f"{len(missing)} of the monitored parameters are not in the optimizer's param groups; "
                            "pass the optimizer that trains them, or params= that it holds")
    first = groups[id(params[0])]
    lr = float(first["lr"])
    # param groups with other learning rates (per-layer rates, muP): a step of rate lr_g is one of
    # rate lr preconditioned by lr / lr_g, so P carries that ratio and the threshold stays lr's
    ratio = torch.cat([torch.full((p.numel(),), lr / float(groups[id(p)]["lr"]), dtype=params[0].dtype,
                                  device=params[0].device) for p in params])
    same = bool((ratio == 1).all())
    if isinstance(optimizer, torch.optim.SGD):
        mom = float(first.get("momentum", 0.0) or 0.0)
        return Preconditioner(None if same else ratio, lr, _sgd_group_threshold(lr, first),
                              "sgd-momentum" if mom else "gd", mom)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, AdaHessian, Sophia)):
        parts = []
        for p in params:
            g, st = groups[id(p)], optimizer.state.get(p, {})
            if not st:
                raise ArgumentError("the optimizer has no state yet (it has not stepped); the preconditioned "
                                    "sharpness is measured after its first step")
            b1, b2 = g["betas"]
            if isinstance(optimizer, Sophia):
                parts.append(torch.clamp_min(g["gamma"] * st["hessian"], g["eps"]).reshape(-1))
                continue
            if isinstance(optimizer, AdaHessian):
                v, t, power = st["exp_hessian_diag_sq"], int(st["hessian_step"]), float(g["hessian_power"])
            else:
                v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
                t, power = int(st["step"]), 1.0
            t1 = int(st["step"])  # the first moment's count (AdaHessian refreshes v less often)
            if t < 1 or t1 < 1:
                raise ArgumentError("the optimizer has no second moment yet (it has not stepped); measure after "
                                    "its first step")
            parts.append(((1 - b1**t1) * ((v / (1 - b2**t)).sqrt() ** power + g["eps"])).reshape(-1))
        b1 = float(first["betas"][0])
        return Preconditioner(torch.cat(parts).to(params[0].dtype) * ratio, lr, adam_threshold(lr, b1),
                              type(optimizer).__name__, b1)
    raise ArgumentError(f"the preconditioned sharpness does not know {type(optimizer).__name__}; it reads the state "
                        f"of {', '.join(SUPPORTED)}. Drop 'preconditioned_sharpness' from quantities for others")


__all__ = ["Preconditioner", "preconditioner", "sgd_threshold", "adam_threshold", "SUPPORTED"]
