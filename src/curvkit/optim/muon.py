"""Muon (Jordan et al. 2024): Nesterov momentum whose update for each 2-D hidden weight is
orthogonalised by Newton-Schulz; every other parameter is trained by AdamW in the same optimizer.

Same-shaped matrices go through :func:`curvkit.approx.matfun.newton_schulz` as ONE batched call
per shape; the momentum and the AdamW part are ``torch._foreach_*`` calls. A step computes
everything out of place, reads ONE finiteness flag (the only host sync), and only then writes the
parameters and the state, so a NaN never reaches either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..approx.matfun import newton_schulz
from ..errors import ArgumentError
from ._base import (CurvkitOptimizer, all_finite, check_betas, check_number, check_positive_int, copy_back,
                    raise_non_finite, state_dtype)

SCALES = ("keller", "moonshot")


def update_scale(rows: int, cols: int, rule: str = "keller") -> float:
    """Factor on the orthogonalised ``(rows, cols)`` update. ``"keller"`` (Jordan's rule):
    ``max(1, rows / cols) ** 0.5``, so that tall matrices get RMS-matched steps; ``"moonshot"``
    (Liu et al. 2025): ``0.2 * max(rows, cols) ** 0.5``, which makes the update's RMS about
    AdamW's, so AdamW's learning rate and weight decay can be reused for the Muon weights."""
    return max(1.0, rows / cols) ** 0.5 if rule == "keller" else 0.2 * max(rows, cols) ** 0.5


def _flat(shape: torch.Size) -> tuple[int, int]:
    """A weight as a matrix: ``(out, in * kh * kw)`` for a convolution kernel."""
    return shape[0], shape[1:].numel()


def muon_directions(grads: list[Tensor], bufs: list[Tensor], *, momentum: float, nesterov: bool,
                    ns_steps: int) -> tuple[list[Tensor], list[tuple[list[int], Tensor]]]:
    r"""Muon's momentum and orthogonalised directions, OUT of place (nothing given is modified).

    ``b' = momentum * b + g``; ``u = g + momentum * b'`` (Nesterov) or ``u = b'``; each ``u``
    flattened to a matrix ``(out, rest)``; ``O = newton_schulz(u, ns_steps)`` for all same-shaped
    ``u`` in one batched call. Returns the new buffers and ``[(indices, O)]``, one entry per
    shape, ``O`` of shape ``(len(indices), rows, cols)``. ``grads`` and ``bufs`` share a dtype
    (float32 for bf16 models). Cost: 3 foreach calls, one stack per shape, and
    ``ns_steps * (4 m^2 n + 2 m^3)`` flops per ``m x n`` matrix (``m <= n``).
    """
    new = torch._foreach_mul(bufs, momentum)
    torch._foreach_add_(new, grads)
    upd = torch._foreach_add(grads, new, alpha=momentum) if nesterov else new
    shapes: dict[tuple, list[int]] = {}
    for i, u in enumerate(upd):
        shapes.setdefault((_flat(u.shape), u.dtype, u.device), []).append(i)
    out = []
    for ((m, n), _, _), idx in shapes.items():
        G = torch.stack([upd[i].reshape(m, n) for i in idx]) if len(idx) > 1 else upd[idx[0]].reshape(1, m, n)
        out.append((idx, newton_schulz(G, ns_steps)))
    return new, out


def apply_directions(params: list[Tensor], directions: list[tuple[list[int], Tensor]], *, lr: float,
                     weight_decay: float, scale: str = "keller") -> None:
    """``p <- p * (1 - lr * weight_decay) - lr * update_scale(m, n) * O`` in place (decoupled
    weight decay), in float32 for bf16 parameters. Cost: 1-2 foreach calls per shape."""
    xs = [p if p.dtype == state_dtype(p) else p.to(state_dtype(p)) for p in params]
    if weight_decay != 0:
        torch._foreach_mul_(xs, 1 - lr * weight_decay)
    for idx, O in directions:
        O = O.to(xs[idx[0]].dtype)
        torch._foreach_add_([xs[i] for i in idx], [O[j].reshape(xs[i].shape) for j, i in enumerate(idx)],
                            alpha=-lr * update_scale(O.shape[1], O.shape[2], scale))
    copy_back(params, xs)


def muon_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                scale: str = "keller") -> None:
    """The functional Muon step, in place on ``params`` and ``momentum_buffers`` (no NaN check;
    :class:`Muon` checks before writing). Cost: :func:`muon_directions` + :func:`apply_directions`."""
    grads = [g.to(b.dtype) for g, b in zip(grads, momentum_buffers)]
    new, directions = muon_directions(grads, momentum_buffers, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps)
    torch._foreach_copy_(momentum_buffers, new)
    apply_directions(params, directions, lr=lr, weight_decay=weight_decay, scale=scale)


def adamw_moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  beta1: float, beta2: float) -> tuple[list[Tensor], list[Tensor]]:
    """AdamW's new first and second moments, out of place, with torch's foreach arithmetic
    (``lerp``, then ``mul`` + ``addcmul``), so the result is bit-identical to torch.optim.AdamW."""
    m = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    v = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    return m, v


def adamw_apply(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], *,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """``p <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)`` in place, as
    torch.optim.AdamW computes it (``steps`` already counts this step). Cost: 5 foreach calls."""
    xs = [p if p.dtype == state_dtype(p) else p.to(state_dtype(p)) for p in params]
    if weight_decay != 0:
        torch._foreach_mul_(xs, 1 - lr * weight_decay)
    step_size = [(lr / (1 - beta1 ** t)) * -1 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(xs, exp_avgs, denom, step_size)
    copy_back(params, xs)


def split_model(model: nn.Module, adamw_params: Any = None) -> list[dict]:
    """Param groups of a model: ``[{"use_muon": True, ...}, {"use_muon": False, ...}]``.

    AdamW: parameters with fewer than 2 dimensions, and the 2-D+ parameters named by
    ``adamw_params`` — by default the weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules and
    of the LAST trainable ``nn.Linear`` in ``model.modules()`` order (taken to be the output head:
    true when the head is created last in ``__init__``; otherwise name it); a regex
    (``re.search`` on the parameter names) or an iterable of names/parameters replaces that rule.
    Muon: every other trainable parameter with 2+ dimensions. Frozen parameters are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if adamw_params is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
        special = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        special += [linears[-1].weight] if linears else []
        chosen = {id(p) for p in special}
    elif isinstance(adamw_params, str):
        try:
            rx = re.compile(adamw_params)
        except re.error as e:
            raise ArgumentError(f"adamw_params={adamw_params!r} is not a valid regular expression: {e}") from e
        chosen = {id(p) for n, p in named if rx.search(n)}
    else:
        items = list(adamw_params)
        names = dict(named)
        unknown = [x for x in items if isinstance(x, str) and x not in names]
        if unknown or not all(isinstance(x, (str, Tensor)) for x in items):
            raise ArgumentError(
                f"adamw_params must be a regex or an iterable of parameter names/tensors of the model; "
                f"not trainable parameter names of it: {unknown or [type(x).__name__ for x in items]}")
        chosen = {id(names[x]) if isinstance(x, str) else id(x) for x in items}
    muon = [p for _, p in named if p.dim() >= 2 and id(p) not in chosen]
    adamw = [p for _, p in named if p.dim() < 2 or id(p) in chosen]
    return [g for g in ({"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}) if g["params"]]


class Muon(CurvkitOptimizer):
    r"""Muon with an AdamW side, as one ``torch.optim.Optimizer`` (``loss.backward(); opt.step()``).

    For a Muon weight ``W`` (``m x n``; a conv kernel flattened to ``(out, in*kh*kw)``):
    ``B <- momentum * B + G``; ``U = G + momentum * B`` (``nesterov``) or ``B``;
    ``W <- W (1 - lr * weight_decay) - lr * s * NS(U)`` with ``NS`` :func:`newton_schulz`
    (``ns_steps`` quintic steps; bfloat16 on CUDA, float32/64 on CPU) and ``s`` given by ``scale``:
    ``"keller"`` ``max(1, m/n)^0.5`` or ``"moonshot"`` ``0.2 max(m, n)^0.5`` (AdamW-matched RMS).
    The AdamW parameters get torch.optim.AdamW's update with ``adamw_lr``, ``adamw_betas``,
    ``adamw_eps`` and ``adamw_weight_decay`` (decoupled).

    Which parameter gets which: given a ``nn.Module``, see :func:`split_model` (embeddings, the
    last ``nn.Linear`` and every <2-D parameter go to AdamW; ``adamw_params=`` overrides). Given
    parameters or param groups: 2-D+ parameters go to Muon, the rest to AdamW; a group may set
    ``use_muon=True`` (all its parameters must be 2-D+) or ``use_muon=False`` (all AdamW), and
    any hyperparameter. Every group ends up one or the other: a group without ``use_muon`` is
    split in two (so ``Muon(model.parameters())`` has 2 groups). In an AdamW group ``lr`` and
    ``weight_decay`` are AdamW's (set from ``adamw_lr``/``adamw_weight_decay``), so a torch LR
    scheduler, which scales every group's ``lr``, schedules both parts alike. State (momentum,
    AdamW moments) is float32 for bf16/fp16 parameters, on the parameters' device. Under
    DistributedDataParallel every rank gets the same averaged gradient and computes the same
    update (each rank orthogonalises every matrix; nothing is sharded).

    >>> import torch
    >>> from curvkit.optim import Muon
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = Muon(model, lr=0.02, adamw_lr=0.01)   # hidden weight: Muon; head and biases: AdamW
    >>> [g["use_muon"] for g in opt.param_groups]
    [True, False]
    >>> for i in range(60):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.cross_entropy(model(x), y)
    ...     first = loss.item() if i == 0 else first
    ...     loss.backward()
    ...     opt.step()
    >>> bool(loss < first / 2)
    True

    Cost per step: one Newton-Schulz batch per distinct matrix shape (``ns_steps`` x 3 batched
    matmuls, about ``5 * (4 m^2 n + 2 m^3)`` flops per matrix, ``m <= n``), about 15 foreach
    calls, and one host sync (the finiteness flag). No extra forward or backward pass.
    """

    def __init__(self, params_or_model: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, scale: str = "keller", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0, adamw_params: Any = None):
        if isinstance(params_or_model, nn.Module):
            params: Any = split_model(params_or_model, adamw_params)
            if not params:
                raise ArgumentError("the model has no trainable parameters")
        elif adamw_params is not None:
            raise ArgumentError("adamw_params needs the model (Muon(model, ...)); with parameters, "
                                "pass param groups with use_muon=False instead")
        else:
            params = params_or_model
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        scale=scale, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                        adamw_weight_decay=adamw_weight_decay, use_muon=None)
        self._check(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check(g: dict) -> None:
        check_number("lr", g["lr"])
        check_number("momentum", g["momentum"], high=1.0)
        if not isinstance(g["nesterov"], bool):
            raise ArgumentError(f"nesterov must be True or False, got {g['nesterov']!r}")
        check_positive_int("ns_steps", g["ns_steps"])
        check_number("weight_decay", g["weight_decay"])
        if g["scale"] not in SCALES:
            raise ArgumentError(f"scale must be one of {SCALES}, got {g['scale']!r}")
        check_number("adamw_lr", g["adamw_lr"])
        check_betas(g["adamw_betas"])
        check_number("adamw_eps", g["adamw_eps"], strict=True)
        check_number("adamw_weight_decay", g["adamw_weight_decay"])
        if g["use_muon"] not in (None, True, False):
            raise ArgumentError(f"use_muon must be True, False or None (by dimension), got {g['use_muon']!r}")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; one without ``use_muon`` is split by dimension into a Muon group and an
        AdamW group. An AdamW group's ``lr``/``weight_decay`` default to ``adamw_lr``/
        ``adamw_weight_decay`` (the group's or the optimizer's)."""
        group = dict(param_group)
        self._check({**self.defaults, **group})
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if group.get("use_muon") is None and params:
            adamw = {k: v for k, v in group.items() if k not in ("lr", "weight_decay")}
            parts = [{**group, "params": [p for p in params if p.dim() >= 2], "use_muon": True},
                     {**adamw, "params": [p for p in params if p.dim() < 2], "use_muon": False}]
            parts = [g for g in parts if g["params"]]
        else:
            parts = [{**group, "params": params, "use_muon": group.get("use_muon") is not False}]
        for g in parts:
            if not g["use_muon"]:
                g.setdefault("lr", g.get("adamw_lr", self.defaults["adamw_lr"]))
                g.setdefault("weight_decay", g.get("adamw_weight_decay", self.defaults["adamw_weight_decay"]))
            self._check({**self.defaults, **g})  # before adding anything: a refused group leaves no trace
            if g["use_muon"] and any(p.dim() < 2 for p in g["params"]):
                raise ArgumentError("a group with use_muon=True holds a parameter with fewer than 2 dimensions; "
                                    "Muon orthogonalises matrices only: put biases and norms in a use_muon=False "
                                    "group")
        for g in parts:
            super().add_param_group(g)
            self.param_groups[-1]["adamw_betas"] = tuple(self.param_groups[-1]["adamw_betas"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step from the gradients in ``p.grad`` (parameters without one are skipped);
        ``closure`` (optional, torch's convention) re-evaluates and returns the loss. Raises
        NonFiniteError, with parameters and state unchanged, on a NaN/inf gradient or update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon, adamw, checks, grads = [], [], [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise ArgumentError("Muon does not support sparse gradients (nn.Embedding(sparse=True))")
            gs = [p.grad if p.grad.dtype == state_dtype(p) else p.grad.to(state_dtype(p)) for p in ps]
            grads += gs
            sts = [self.state.get(p, {}) for p in ps]  # .get: a failed step must not create state
            if group["use_muon"]:
                bufs = [st["momentum_buffer"] if "momentum_buffer" in st else torch.zeros_like(g)
                        for st, g in zip(sts, gs)]
                new, dirs = muon_directions(gs, bufs, momentum=group["momentum"], nesterov=group["nesterov"],
                                            ns_steps=group["ns_steps"])
                dirs = [(idx, O.to(gs[idx[0]].dtype)) for idx, O in dirs]  # checked in the state dtype
                muon.append((group, ps, new, dirs))
                checks += [O for _, O in dirs]
            else:
                ea = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(g) for st, g in zip(sts, gs)]
                sq = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(g) for st, g in zip(sts, gs)]
                m, v = adamw_moments(gs, ea, sq, *group["adamw_betas"])
                adamw.append((group, ps, m, v))
                checks += v  # v = b2 v + (1 - b2) g^2 is NaN/inf whenever the gradient is
        if not checks:
            return loss
        if not all_finite(checks):  # the one host sync of the step
            raise_non_finite("the orthogonalised update", loss if isinstance(loss, Tensor) else None, grads)
        for group, ps, new, dirs in muon:
            for p, b in zip(ps, new):
                self.state[p]["momentum_buffer"] = b
            apply_directions(ps, dirs, lr=group["lr"], weight_decay=group["weight_decay"], scale=group["scale"])
        for group, ps, m, v in adamw:
            steps = []
            for p, mi, vi in zip(ps, m, v):
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                st["exp_avg"], st["exp_avg_sq"] = mi, vi
                steps.append(st["step"])
            b1, b2 = group["adamw_betas"]
            adamw_apply(ps, m, v, steps, lr=group["lr"], beta1=b1, beta2=b2, eps=group["adamw_eps"],
                        weight_decay=group["weight_decay"])
        return loss
