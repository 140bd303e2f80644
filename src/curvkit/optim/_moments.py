"""The arithmetic several optimizers share, written once: exponential moving averages (Adam's
moments, Sophia's Hessian EMA), Adam's denominator, heavy-ball momentum and the decoupled
weight-decay update.

Everything works on lists of tensors with ``torch._foreach_*`` kernels (one launch per list on
CUDA; on CPU, or for lists that mix dtypes, torch runs them one tensor at a time with the same
arithmetic). The formulas are torch.optim.AdamW's, op for op, so an AdamW built from them is bit
for bit torch's. Functions ending in ``_`` work in place; the others return new tensors and leave
their inputs alone (the staged step: nothing is written before the finiteness check).
"""

from __future__ import annotations

from torch import Tensor
import torch


def ema(avgs: list[Tensor], xs: list[Tensor], beta: float) -> list[Tensor]:
    """``beta * avg + (1 - beta) * x`` out of place (``lerp``: Adam's first moment, Sophia's
    Hessian EMA). Cost: one foreach call."""
    return torch._foreach_lerp(avgs, xs, 1 - beta)


def ema_(avgs: list[Tensor], xs: list[Tensor], beta: float) -> None:
    """:func:`ema` in place."""
    torch._foreach_lerp_(avgs, xs, 1 - beta)


def ema_sq(avgs: list[Tensor], xs: list[Tensor], beta: float) -> list[Tensor]:
    """``beta * avg + (1 - beta) * x**2`` out of place (Adam's second moment; AdaHessian's, with
    ``x`` the Hessian diagonal), as torch's ``mul`` + ``addcmul``. Cost: two foreach calls."""
    out = torch._foreach_mul(avgs, beta)
    torch._foreach_addcmul_(out, xs, xs, 1 - beta)
    return out


def ema_sq_(avgs: list[Tensor], xs: list[Tensor], beta: float) -> None:
    """:func:`ema_sq` in place."""
    torch._foreach_mul_(avgs, beta)
    torch._foreach_addcmul_(avgs, xs, xs, 1 - beta)


def adam_moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 beta1: float, beta2: float) -> tuple[list[Tensor], list[Tensor]]:
    """Adam's new moments ``(m, v)`` out of place: :func:`ema` of ``g`` and :func:`ema_sq` of
    ``g``. ``grads`` in the moments' dtype. Cost: three foreach calls."""
    return ema(exp_avgs, grads, beta1), ema_sq(exp_avg_sqs, grads, beta2)


def adam_denominator(exp_avg_sqs: list[Tensor], steps: list[int] | None, beta2: float, eps: float,
                     power: float = 1.0) -> list[Tensor]:
    """``(sqrt(v) / sqrt(1 - beta2^t))^power + eps`` per tensor (``steps``: the ``t`` of each,
    counting this step; ``None``: no bias correction, ``sqrt(v) + eps``). ``power`` is
    AdaHessian's Hessian power (1: Adam). Cost: two to four foreach calls."""
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if steps is not None:
        torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
    if power != 1:
        torch._foreach_pow_(denom, power)
    torch._foreach_add_(denom, eps)
    return denom


def bias_corrected(exp_avgs: list[Tensor], steps: list[int], beta1: float) -> list[Tensor]:
    """``m / (1 - beta1^t)`` out of place. Cost: one foreach call."""
    return torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])


def heavy_ball(bufs: list[Tensor], dirs: list[Tensor], momentum: float) -> list[Tensor]:
    """``momentum * buf + d`` out of place (SGD's momentum; a zero buffer gives ``d``). Cost: two
    foreach calls."""
    out = torch._foreach_mul(bufs, momentum)
    torch._foreach_add_(out, dirs)
    return out


def decoupled_update(params: list[Tensor], dirs: list[Tensor], lr: float, weight_decay: float, *,
                     alphas: list[float] | None = None, denoms: list[Tensor] | None = None,
                     decay_first: bool = True) -> None:
    """In place: ``p <- p (1 - lr weight_decay) + alpha d`` (``alpha = -lr`` unless ``alphas``
    gives one per tensor; with ``denoms``, ``+ alpha d / denom``, torch's ``addcdiv``).
    ``decay_first=False`` decays after the step (SOAP's order). The arithmetic is in the
    directions' dtype (float32 state of bf16 parameters), the result written back in each
    parameter's dtype. Cost: two or three foreach calls."""
    if not params:
        return
    xs = [p if p.dtype == d.dtype else p.to(d.dtype) for p, d in zip(params, dirs)]
    if weight_decay and decay_first:
        torch._foreach_mul_(xs, 1 - lr * weight_decay)
    if denoms is not None:
        torch._foreach_addcdiv_(xs, dirs, denoms, alphas if alphas is not None else [-lr] * len(xs))
    elif alphas is not None:  # one call per distinct alpha (Muon: one per matrix shape)
        by: dict[float, list[int]] = {}
        for i, a in enumerate(alphas):
            by.setdefault(a, []).append(i)
        for a, idx in by.items():
            torch._foreach_add_([xs[i] for i in idx], [dirs[i] for i in idx], alpha=a)
    else:
        torch._foreach_add_(xs, dirs, alpha=-lr)
    if weight_decay and not decay_first:
        torch._foreach_mul_(xs, 1 - lr * weight_decay)
    copy_back(params, xs)


def copy_back(params: list[Tensor], xs: list[Tensor]) -> None:
    """Write values computed in the state dtype (``xs``) back into their parameters, in one foreach
    call; a parameter that is its own working copy (same dtype, updated in place) is skipped."""
    pairs = [(p, x) for p, x in zip(params, xs) if p is not x]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [x for _, x in pairs])


def tensor_batches(foreach: bool | None, params: list[Tensor], *state: list[Tensor]) -> list[list[int]]:
    """The index lists an update runs over: all parameters at once when the multi-tensor path
    applies (asked for, or ``None`` on CUDA, and every parameter shares the device and dtype of
    its state), else one parameter at a time. Both give the same arithmetic."""
    n = len(params)
    if foreach is False or not params or (foreach is None and not all(p.is_cuda for p in params)):
        return [[i] for i in range(n)]
    dev, dt = params[0].device, params[0].dtype
    if all(t.device == dev and t.dtype == dt for ts in (params, *state) for t in ts):
        return [list(range(n))]
    return [[i] for i in range(n)]
