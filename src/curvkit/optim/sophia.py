"""Sophia (Liu et al. 2023): momentum preconditioned by an occasionally refreshed Hessian
diagonal, with the per-coordinate step clipped."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ArgumentError, LossError
from ..model.losses import LossSpec
from ._base import renamed, state_dtype
from ._diag import DiagonalOptimizer, check_hyper
from ._moments import decoupled_update, ema_, tensor_batches


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
    r"""Sophia's step as a function: ``params``, ``exp_avgs`` and ``hessians`` are updated in place.

    ``m = b1 m + (1 - b1) g``; when ``diags`` is given (a refresh step) ``h = b2 h + (1 - b2) d``;
    then ``p = p * (1 - lr * weight_decay) - lr * clip(m / max(gamma * h, eps), -1, 1)``.
    Weight decay is decoupled. State and arithmetic in ``state_dtype`` (float32 for bf16), the
    result written back in the parameter's dtype. ``foreach`` (default: on CUDA) runs the update
    as a few multi-tensor kernels rather than a few per parameter (the same arithmetic). Cost:
    no products (the diagonal is given).
    """
    for idx in tensor_batches(foreach, params, exp_avgs, hessians):
        m, h = [exp_avgs[i] for i in idx], [hessians[i] for i in idx]
        ema_(m, [grads[i].to(m[k].dtype) for k, i in enumerate(idx)], beta1)
        if diags is not None:
            ema_(h, [diags[i] for i in idx], beta2)
        denom = torch._foreach_mul(h, gamma)
        torch._foreach_clamp_min_(denom, eps)
        ratio = torch._foreach_div(m, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        decoupled_update([params[i] for i in idx], ratio, lr, weight_decay)


class Sophia(DiagonalOptimizer):
    r"""Sophia (Liu et al., ICLR 2024) as a ``torch.optim.Optimizer``.

    Update ``clip(m / max(gamma * h, eps), 1)`` with ``m`` the gradient EMA and ``h`` the EMA of
    a Hessian-diagonal estimate refreshed every ``every`` steps (unchanged in between; the
    deprecated name ``update_each`` still works), and decoupled weight decay. Two estimators
    (``estimator``, per param group):

    - ``"hutchinson"`` (Sophia-H): ``z * (H z)`` with a Rademacher ``z``, the same samples as
      ``ck.diagonal``. Drive it as AdaHessian: torch's loop with
      ``loss.backward(create_graph=True); opt.step()``, or ``opt.step(closure)`` with a closure
      that returns the loss without calling ``backward``.
    - ``"gnb"`` (Sophia-G, Gauss-Newton-Bartlett): the closure returns ``(loss, outputs)``, the
      model's outputs from the same forward pass. On refresh steps the optimizer samples targets
      from the likelihood of ``loss`` (a torch loss module or a ``curvkit.model`` spec; default
      cross-entropy over the last dimension of ``outputs``) with its own seeded CPU generator,
      takes the gradient ``g_hat`` of ``loss(outputs, sampled)`` and uses ``terms * g_hat**2``
      (:func:`curvkit.optim._diag.gnb_diagonal`), an unbiased estimate of the Gauss-Newton
      diagonal. A loss without a likelihood (an arbitrary function) is refused.

    Either accepts a closure returning ``(loss, outputs)`` (Sophia-H ignores the outputs), so
    one closure serves both. ``loss`` is not saved in the state_dict: pass it again, as the model.

    >>> import torch
    >>> from curvkit.optim import Sophia
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(8, 3)
    >>> x = torch.randn(128, 8); y = (x[:, :3]).argmax(1)
    >>> def closure():
    ...     logits = model(x)
    ...     return torch.nn.functional.cross_entropy(logits, y), logits
    >>> opt = Sophia(model.parameters(), lr=0.05, estimator="gnb", every=5, seed=0)
    >>> first = opt.step(closure)
    >>> for _ in range(40):
    ...     loss = opt.step(closure)
    >>> bool(loss < first / 2)
    True

    Cost per step: one forward and one backward pass; every ``every`` steps also one
    Hessian-vector product (Hutchinson: a double backward, about 2 gradients) or one extra
    backward pass (GNB). With the default ``every=10`` about 1.1-1.2x an AdamW step.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        eps: float = 1e-12,
        weight_decay: float = 0.1,
        every: int = 10,
        estimator: str = "hutchinson",
        seed: int | torch.Generator | None = 0,
        foreach: bool | None = None,
        loss: Any = None,
        update_each: int | None = None,
    ):
        every = renamed("Sophia", "every", every, 10, "update_each", update_each)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, gamma=gamma,
                        eps=eps, weight_decay=weight_decay, every=every, estimator=estimator, foreach=foreach)
        super().__init__(params, defaults, seed, loss)
        if any(g["estimator"] == "gnb" for g in self.param_groups):
            _needs_likelihood(self.loss_spec)

    @staticmethod
    def _check_group(g: dict) -> None:
        check_hyper(g)
        gamma = g["gamma"]
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0.0 < gamma < float("inf"):
            raise ArgumentError(f"gamma must be a finite number > 0 (the paper uses 0.01-0.05), got {gamma!r}")
        if g["estimator"] not in ("hutchinson", "gnb"):
            raise ArgumentError(f"estimator must be 'hutchinson' (Sophia-H) or 'gnb' (Sophia-G), got {g['estimator']!r}")

    def _estimator(self, group: dict) -> str:
        return group["estimator"]

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
            weight_decay=group["weight_decay"], foreach=group["foreach"],
        )


def _needs_likelihood(spec: LossSpec) -> None:
    """Sophia-G samples targets from the loss's likelihood: a loss without one is refused with the
    spec's own error (what it knows and what to use instead), plus what to do here."""
    if spec.has_likelihood:
        return
    try:
        spec.sample(torch.zeros(1, 1), torch.Generator())
    except LossError as e:
        e.add_note("Sophia(estimator='gnb') needs such a loss (pass it as loss=); otherwise use "
                   "estimator='hutchinson'")
        raise
    raise LossError(f"Sophia(estimator='gnb') needs a loss with a likelihood to sample targets from; "
                    f"{spec.describe()} has none: pass loss= a CrossEntropy, NLL, MSE or BCEWithLogits "
                    "(module or spec), or use estimator='hutchinson'")
