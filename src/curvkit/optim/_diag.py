"""Shared pieces of the diagonal-preconditioned optimizers (AdaHessian, Sophia).

- :func:`hvp_operator`: the Hessian of the loss behind a set of gradients, as a flat
  ``LinearOperator``, by double backward through the gradients' own graph.
- :func:`hutchinson_diagonal`: the Hessian diagonal from the SAME Hutchinson samples as
  ``ck.diagonal`` (:func:`curvkit.linalg.diagonal.hutchinson_samples`), split per parameter.
- :func:`gnb_diagonal`: Sophia's Gauss-Newton-Bartlett estimate from targets sampled by a loss
  spec (:mod:`curvkit.model.losses`).
- :class:`DiagonalOptimizer`: how both get their gradients (torch's loop, ``step(closure)``),
  the refresh schedule per group, and the step protocol of :mod:`curvkit.optim._base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import LossError, ModelError
from ..linalg.diagonal import hutchinson_samples
from ..linear_operator import FunctionOperator
from ..model import CrossEntropy, loss_spec
from ..model.losses import LossSpec
from ..seeding import generator
from ._base import CurvkitOptimizer, Staged, check_betas, check_number, check_positive_int, refresh_due, state_dtype


def _flat_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32


def hvp_operator(grads: list[Tensor], params: list[Tensor]) -> FunctionOperator:
    """The Hessian of the loss behind ``grads`` as an operator on flat vectors over ``params``.

    ``grads`` must carry their graph: from ``torch.autograd.grad(loss, params,
    create_graph=True)`` or ``loss.backward(create_graph=True)`` (then ``p.grad``). This is a
    second Hessian-vector product next to ``ck.hessian`` on purpose: ``ck.hessian`` re-runs the
    model on data it is given, while an optimizer step has only the graph the user's forward
    pass built (any model, any loss, the batch already evaluated), and differentiating that
    graph again is the one way to its Hessian without a second forward pass. float32 (float64
    if every parameter is), whatever the parameters' dtype. Cost: each column of a product is
    one double-backward pass (about two gradient computations).
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
    out_grads, _ = zip(*outs)
    used = [g.requires_grad for g in grads]

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


def gnb_diagonal(spec: LossSpec, outputs: Tensor, params: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    r"""Gauss-Newton-Bartlett diagonal ``g_hat**2 / c``: ``g_hat`` the gradient of
    ``spec(outputs, y_hat)`` with targets ``y_hat = spec.sample(outputs, gen)`` drawn from the
    model's predictive distribution, ``c`` the loss's reduction factor (``1 / terms`` for a
    mean, so ``terms * g_hat**2``: Sophia's ``B * g_hat**2``).

    ``E[g_hat g_hat^T] = c * GGN`` (per term, the expected outer product of a negative
    log-likelihood's gradient is its output Hessian), so the estimate is unbiased for the
    diagonal of the Gauss-Newton matrix of the loss. The spec samples with ``gen`` on the CPU
    (the same stream on every device). Cost: one extra backward pass through the graph of
    ``outputs``.
    """
    with torch.no_grad():
        y = spec.sample(outputs.detach(), gen)
    with torch.enable_grad():
        L = spec(outputs, y)
        g = torch.autograd.grad(L, params, retain_graph=True, allow_unused=True)
    scale = 1.0 / spec.factor(outputs, y)
    return [
        (gi.to(state_dtype(p)) ** 2 * scale) if gi is not None else torch.zeros_like(p, dtype=state_dtype(p))
        for gi, p in zip(g, params)
    ]


def check_hyper(g: dict) -> None:
    """ArgumentError for a hyperparameter both optimizers have outside its range."""
    check_number("lr", g["lr"])
    check_betas(g["betas"])
    check_number("eps", g["eps"], strict=True)
    check_number("weight_decay", g["weight_decay"])
    check_positive_int("every", g["every"])


_CREATE_GRAPH = ("loss.backward(create_graph=True) before opt.step(), or pass the loss as a closure that does "
                 "not call backward: opt.step(lambda: loss_fn(model(x), y))")


class DiagonalOptimizer(CurvkitOptimizer):
    """Base of AdaHessian and Sophia: their gradients, their curvature, one schedule, one generator.

    Three ways to drive a step:

    - torch's loop, ``loss.backward(create_graph=True); opt.step()``: gradients from ``p.grad``,
      Hessian-vector products through the graph ``create_graph=True`` keeps there (only refresh
      steps need it; without it a refresh step raises ArgumentError saying so);
    - ``opt.step(closure)``, the closure returning the loss WITHOUT calling backward: the
      optimizer differentiates it, with ``create_graph=True`` only on refresh steps;
    - ``opt.step(closure)`` with torch's closure that calls ``backward`` itself: as the torch loop.

    Sophia-G (``estimator="gnb"``) needs the model's outputs: a closure returning
    ``(loss, outputs)`` (either kind of closure). Afterwards ``p.grad`` holds the gradient,
    detached (which also frees the graph ``create_graph=True`` kept). Subclasses implement
    :meth:`_estimator` and :meth:`_update_group`.
    """

    _renamed = {"update_each": "every"}

    def __init__(self, params: Any, defaults: dict, seed: Any, loss: Any = None):
        super().__init__(params, defaults)
        self._gen = generator(seed)  # CPU, so the stream is the same on every device
        self._steps = 0
        self.loss_spec = CrossEntropy(class_dim=-1) if loss is None else loss_spec(loss)

    # --- what subclasses provide ----------------------------------------------------------
    def _estimator(self, group: dict) -> str:  # "hutchinson" or "gnb"
        raise NotImplementedError

    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor], diags: list[Tensor] | None) -> None:
        raise NotImplementedError

    # --- gradients --------------------------------------------------------------------------
    def _closure_output(self, out: Any, gnb: bool) -> tuple[Tensor, Tensor | None]:
        outputs = None
        if isinstance(out, (tuple, list)) and len(out) == 2:
            out, outputs = out
        elif gnb:
            raise LossError(
                f"estimator='gnb' needs the closure to return (loss, outputs), got {type(out).__name__}; "
                "return the model's outputs (the logits for cross-entropy) with the loss"
            )
        if not isinstance(out, Tensor):
            raise LossError(
                f"the closure returned {type(out).__name__}, not the loss tensor; end it with "
                "`return loss_fn(model(x), y)` and do not call .item() in it"
            )
        if out.numel() != 1:
            raise LossError(
                f"the closure returned a tensor of shape {tuple(out.shape)}; return a scalar loss "
                "(reduce it with .mean() or use the loss's default reduction)"
            )
        if gnb and (not isinstance(outputs, Tensor) or not outputs.requires_grad):
            raise LossError(
                "estimator='gnb' needs the closure's second output to be the model's outputs (the logits "
                "for cross-entropy) with their graph to the parameters (not detached)"
            )
        return out.reshape(()), outputs

    def _gradients(self, closure: Callable[[], Any] | None, params: list[Tensor], hutch: bool, gnb: bool,
                   refresh: bool) -> tuple[Tensor | None, Tensor | None, list[Tensor | None], str | None]:
        """``(loss, outputs, grads, backward)``: ``grads[i]`` the gradient of ``params[i]`` (``None``:
        the torch loop gave it none), with its graph on refresh steps where the closure is
        differentiated here; ``backward`` says who called backward (``None``: this method)."""
        if closure is None:
            if gnb:
                raise LossError(
                    f"{type(self).__name__}(estimator='gnb') samples targets from the model's outputs on "
                    f"this step (a refresh step): pass opt.step(closure) with a closure that returns "
                    "(loss, outputs)"
                )
            return None, None, [p.grad for p in params], "opt.step() found the gradients of loss.backward()"
        before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        with torch.enable_grad():
            loss, outputs = self._closure_output(closure(), any(self._estimator(g) == "gnb" for g in self.param_groups))
            # torch's closure convention: it called backward itself (p.grad replaced or added to)
            if any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in zip(params, before)) \
                    and any(p.grad is not None for p in params):
                return loss, outputs, [p.grad for p in params], "the closure called loss.backward()"
            if not loss.requires_grad:
                raise ModelError(
                    "the loss does not depend on the optimizer's parameters (it has no gradient "
                    "graph); compute it from the model outside torch.no_grad() and do not detach it"
                )
            grads = torch.autograd.grad(loss, params, create_graph=hutch, retain_graph=refresh, allow_unused=True)
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused:
            shapes = [tuple(params[i].shape) for i in unused]
            raise ModelError(
                f"the loss does not depend on {len(unused)} parameter(s) of shapes {shapes}; "
                "freeze them (p.requires_grad_(False)) or leave them out of the optimizer"
            )
        return loss, outputs, list(grads), None

    # --- the step ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimizer step; returns the closure's loss (detached), ``None`` without a closure.

        Raises NonFiniteError, with parameters, state and the generator unchanged, on a NaN/inf
        loss, gradient or curvature estimate. Cost: with a closure one forward and one backward
        pass; on refresh steps also one Hessian-vector product per probe (Hutchinson, double
        backward) or one extra backward pass (GNB).
        """
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ModelError("no parameter of this optimizer requires grad; nothing to train")
        # a group also refreshes when it has no estimate yet (added by add_param_group mid-run)
        # (only its trainable parameters: a frozen one never gets state and would refresh every step)
        due = [refresh_due(self._steps, g["every"]) or any(not self.state.get(p) for p in g["params"] if p.requires_grad)
               for g in self.param_groups]
        est = [self._estimator(g) for g in self.param_groups]
        hutch = any(d and e == "hutchinson" for d, e in zip(due, est))
        gnb = any(d and e == "gnb" for d, e in zip(due, est))
        gen_state = self._gen.get_state()
        try:
            loss, outputs, grads, backward = self._gradients(closure, params, hutch, gnb, any(due))
        except BaseException:
            self._gen.set_state(gen_state)
            raise
        grad_of = {id(p): g for p, g in zip(params, grads)}
        groups = [(group, [p for p in group["params"] if p.requires_grad and grad_of.get(id(p)) is not None], d, e)
                  for group, d, e in zip(self.param_groups, due, est)]

        def prepare() -> Staged:
            new = Staged()
            diags: dict[int, Tensor] = {}
            for kind in ("hutchinson", "gnb"):
                ps = [p for group, gps, d, e in groups if d and e == kind for p in gps]
                if ps:
                    diags.update(zip(map(id, ps), self._curvature(kind, ps, [grad_of[id(p)] for p in ps], outputs,
                                                                  backward)))
            used = [grad_of[id(p)] for _, gps, _, _ in groups for p in gps]
            new.check += used + list(diags.values())
            for group, gps, d, _ in groups:
                gs = [grad_of[id(p)].detach() for p in gps]
                new.then(_update(self, group, gps, gs, [diags[id(p)] for p in gps] if d else None))
            new.then(self._count)
            return new

        self._run_step(prepare, "the curvature estimate", loss, [g for g in grads if g is not None])
        return None if loss is None else loss.detach()

    def _curvature(self, kind: str, params: list[Tensor], grads: list[Tensor], outputs: Tensor | None,
                   backward: str | None) -> list[Tensor]:
        if kind == "hutchinson":
            if backward is not None and not any(g.requires_grad for g in grads):
                raise ModelError(
                    f"{backward} without create_graph=True, but {type(self).__name__} refreshes its Hessian "
                    f"diagonal on this step (every={self.param_groups[0]['every']}) through the gradient's graph: "
                    f"call {_CREATE_GRAPH}. (If you did, the loss is linear in the parameters: no curvature.)"
                )
            return hutchinson_diagonal(grads, params, self._gen)
        try:
            return gnb_diagonal(self.loss_spec, outputs, params, self._gen)
        except RuntimeError as e:
            if "second time" not in str(e):
                raise
            raise ModelError(
                "the closure called loss.backward(), which freed the graph of its outputs, but Sophia-G takes "
                "one more backward pass through them on refresh steps: return (loss, outputs) without calling "
                "backward (the optimizer differentiates the loss), or call loss.backward(retain_graph=True)"
            ) from e

    def _count(self) -> None:
        self._steps += 1

    # --- state ----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"steps": self._steps, "generator": self._gen.get_state()}

    def _load_extra_state(self, extra: dict) -> None:
        self._steps = int(extra["steps"])
        self._gen.set_state(extra["generator"].cpu())


def _update(opt: DiagonalOptimizer, group: dict, params: list[Tensor], grads: list[Tensor],
            diags: list[Tensor] | None) -> Callable[[], None]:
    """The commit of one group: its gradients left in ``p.grad`` (detached: the graph
    ``create_graph=True`` kept is freed), then the optimizer's own update."""
    def run() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        if params:
            with torch.no_grad():
                opt._update_group(group, params, grads, diags)
    return run
