"""Shared pieces of the diagonal-preconditioned optimizers (AdaHessian, Sophia).

- :func:`hvp_operator`: the current batch's Hessian as a flat ``LinearOperator`` built by double
  backward from gradients taken with ``create_graph=True``.
- :func:`hutchinson_diagonal`: the Hessian diagonal from the SAME Hutchinson samples as
  ``ck.diagonal`` (:func:`curvkit.linalg.diagonal.hutchinson_samples`), split per parameter.
- :func:`gnb_diagonal`: Sophia's Gauss-Newton-Bartlett estimate from sampled labels.
- :class:`DiagonalOptimizer`: the step protocol both classes share (closure checks, the refresh
  schedule, the seeded generator and its place in ``state_dict``, NaN checks before any write).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError, LossError, ModelError
from ..seeding import generator
from ..linalg.diagonal import hutchinson_samples
from ..linear_operator import FunctionOperator
from ._base import (CurvkitOptimizer, all_finite, check_betas, check_number, check_positive_int,
                    raise_non_finite, state_dtype)

def _flat_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32


def hvp_operator(grads: list[Tensor], params: list[Tensor]) -> FunctionOperator:
    """The Hessian of the loss behind ``grads`` as an operator on flat vectors over ``params``.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``. float32
    (float64 if every parameter is), whatever the parameters' dtype. Cost: each column of a
    product is one double-backward pass (about two gradient computations).
    """
    sizes = [p.numel() for p in params]
    dtype = _flat_dtype(params)
    outs = [(g, p) for g, p in zip(grads, params) if g.requires_grad]
    if not outs:
        raise ModelError(
            "the gradient has no graph to differentiate again, so no Hessian-vector product can be "
            "formed: the loss is linear in the parameters, or the closure detached it; return the "
            "loss straight from the model's forward pass (not under torch.no_grad, not .detach()ed)"
        )
    out_grads, out_params = zip(*outs)
    used = [any(g is o for o in out_grads) for g in grads]

    def matmat(V: Tensor) -> Tensor:
        cols = []
        for j in range(V.shape[1]):
            zs = [z.view_as(p).to(device=p.device, dtype=p.dtype) for z, p in zip(V[:, j].split(sizes), params)]
            hv = torch.autograd.grad(
                out_grads, params, [z for z, u in zip(zs, used) if u], retain_graph=True, allow_unused=True
            )
            cols.append(torch.cat([
                (h if h is not None else torch.zeros_like(p)).reshape(-1).to(device=V.device, dtype=dtype)
                for h, p in zip(hv, params)
            ]))
        return torch.stack(cols, 1)

    return FunctionOperator(matmat, sum(sizes), dtype, params[0].device)


def hutchinson_diagonal(grads: list[Tensor], params: list[Tensor], gen: torch.Generator, probes: int = 1) -> list[Tensor]:
    """Per-parameter Hutchinson estimate of the Hessian diagonal (mean of ``z * (H z)``).

    The samples come from ``hutchinson_samples``, the code ``ck.diagonal`` averages. Cost:
    ``probes`` Hessian-vector products (double backward passes).
    """
    A = hvp_operator(grads, params)
    d = hutchinson_samples(A, probes, gen).mean(1)
    return [x.view_as(p).to(state_dtype(p)) for x, p in zip(d.split([p.numel() for p in params]), params)]


def gnb_diagonal(logits: Tensor, params: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    r"""Gauss-Newton-Bartlett diagonal: ``B * g_hat**2`` with ``g_hat`` the gradient of the mean
    cross-entropy of ``logits`` against labels sampled from ``softmax(logits)``.

    ``logits`` is ``(..., C)``; ``B`` is the number of rows (all dims but the last). Sampling is
    by inverse CDF with ``B`` uniforms from ``gen`` (CPU), so only ``B`` numbers move to the
    device. Cost: one extra backward pass through the graph of ``logits``.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        cdf = torch.softmax(rows.detach().float(), -1).cumsum(-1)
        u = torch.rand(rows.shape[0], 1, generator=gen, device=gen.device).to(cdf.device) * cdf[:, -1:]
        y = torch.searchsorted(cdf, u).squeeze(1).clamp_max(rows.shape[1] - 1)
    g = torch.autograd.grad(F.cross_entropy(rows, y), params, retain_graph=True, allow_unused=True)
    B = rows.shape[0]
    return [
        (B * gi.to(state_dtype(p)) ** 2) if gi is not None else torch.zeros_like(p, dtype=state_dtype(p))
        for gi, p in zip(g, params)
    ]


def refresh_due(step: int, update_each: int) -> bool:
    """The schedule: the diagonal is re-estimated on steps 0, k, 2k, ... and reused in between."""
    return step % update_each == 0


def check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, update_each: Any) -> None:
    """ArgumentError for a hyperparameter outside its range, saying which and what is accepted."""
    check_number("lr", lr)
    check_betas(betas)
    check_number("eps", eps, strict=True)
    check_number("weight_decay", weight_decay)
    check_positive_int("update_each", update_each)


class DiagonalOptimizer(CurvkitOptimizer):
    """Base of AdaHessian and Sophia: one ``step(closure)`` protocol, one schedule, one generator.

    ``step(closure)``: the closure runs the forward pass and returns the loss (Sophia-GNB:
    ``(loss, logits)``) WITHOUT calling backward. The optimizer differentiates it itself — with
    ``create_graph=True`` on steps that refresh a Hutchinson diagonal, plainly otherwise — writes
    the gradients to ``p.grad`` for inspection, checks loss, gradients and curvature for NaN/inf,
    and only then updates the parameters. Subclasses implement :meth:`_estimator` and
    :meth:`_update_group`.
    """

    def __init__(self, params: Any, defaults: dict, seed: int | None):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ArgumentError(f"seed must be an int or None, got {seed!r}")
        super().__init__(params, defaults)
        self._gen = generator(seed)  # CPU, so the stream is the same on every device
        self._steps = 0

    # --- what subclasses provide ----------------------------------------------------------
    def _estimator(self) -> str:  # "hutchinson" or "gnb"
        raise NotImplementedError

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor], diags: list[Tensor] | None) -> None:
        raise NotImplementedError

    # --- the step ---------------------------------------------------------------------------
    def _closure_output(self, out: Any) -> tuple[Tensor, Tensor | None]:
        gnb = self._estimator() == "gnb"
        logits = None
        if isinstance(out, (tuple, list)) and len(out) == 2:
            out, logits = out
        elif gnb:
            raise LossError(
                f"estimator='gnb' needs the closure to return (loss, logits), got {type(out).__name__}; "
                "return the model's output logits (..., num_classes) with the loss"
            )
        if not isinstance(out, Tensor):
            raise LossError(
                f"the closure returned {type(out).__name__}, not the loss tensor; end it with "
                "`return loss_fn(model(x), y)` and do not call loss.backward() or .item() in it"
            )
        if out.numel() != 1:
            raise LossError(
                f"the closure returned a tensor of shape {tuple(out.shape)}; return a scalar loss "
                "(reduce it with .mean() or use the loss's default reduction)"
            )
        if gnb and (not isinstance(logits, Tensor) or logits.dim() < 2 or not logits.requires_grad):
            raise LossError(
                "estimator='gnb' needs the closure's second output to be the logits (..., num_classes) "
                "with their graph to the parameters (not detached)"
            )
        return out.reshape(()), logits

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One optimizer step; returns the closure's loss (detached).

        Cost: one forward and one backward pass; on refresh steps also one Hessian-vector product
        per probe (Hutchinson, double backward) or one extra backward pass (GNB).
        """
        if closure is None:
            raise ArgumentError(
                f"{type(self).__name__}.step needs a closure that runs the forward pass and returns "
                "the loss (without calling backward): opt.step(lambda: loss_fn(model(x), y))"
            )
        params = self._params()
        if not params:
            raise ModelError("no parameter of this optimizer requires grad; nothing to train")
        # a group also refreshes when it has no estimate yet (added by add_param_group mid-run)
        due = [refresh_due(self._steps, g["update_each"]) or any(not self.state[p] for p in g["params"])
               for g in self.param_groups]
        refresh = any(due)
        hutch = refresh and self._estimator() == "hutchinson"
        gen_state = self._gen.get_state()
        try:
            with torch.enable_grad():
                loss, logits = self._closure_output(closure())
                if not loss.requires_grad:
                    raise ModelError(
                        "the loss does not depend on the optimizer's parameters (it has no gradient "
                        "graph); compute it from the model outside torch.no_grad() and do not detach it"
                    )
                grads = torch.autograd.grad(loss, params, create_graph=hutch,
                                            retain_graph=refresh, allow_unused=True)
                unused = [i for i, g in enumerate(grads) if g is None]
                if unused:
                    shapes = [tuple(params[i].shape) for i in unused]
                    raise ModelError(
                        f"the loss does not depend on {len(unused)} parameter(s) of shapes {shapes}; "
                        "freeze them (p.requires_grad_(False)) or leave them out of the optimizer"
                    )
                diags = None
                if refresh and all_finite([loss, *grads]):  # no curvature of a NaN gradient
                    diags = (hutchinson_diagonal(grads, params, self._gen) if hutch
                             else gnb_diagonal(logits, params, self._gen))
                # one host read per step: a check per tensor would stall the GPU once per parameter
                if not all_finite([loss, *grads, *(diags or [])]) or (refresh and diags is None):
                    raise_non_finite("the curvature estimate", loss, grads)
        except BaseException:
            self._gen.set_state(gen_state)  # a failed step leaves the random stream where it was
            raise
        grads = [g.detach() for g in grads]  # drops the double-backward graph before the update
        with torch.no_grad():
            i = 0
            for group, d in zip(self.param_groups, due):
                ps = [p for p in group["params"] if p.requires_grad]
                gs, ds = grads[i : i + len(ps)], (diags[i : i + len(ps)] if d else None)
                i += len(ps)
                for p, g in zip(ps, gs):
                    p.grad = g
                self._update_group(group, ps, gs, ds)
        self._steps += 1
        return loss.detach()

    # --- state ----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"steps": self._steps, "generator": self._gen.get_state()}

    def _load_extra_state(self, extra: dict) -> None:
        self._steps = int(extra["steps"])
        self._gen.set_state(extra["generator"].cpu())
