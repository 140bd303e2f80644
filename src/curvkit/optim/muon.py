"""Muon (Jordan et al. 2024): Nesterov momentum whose update for each 2-D hidden weight is
orthogonalised by Newton-Schulz; every other parameter is trained by AdamW in the same optimizer.

Same-shaped matrices go through :func:`curvkit.approx.matfun.newton_schulz` as ONE batched call
per shape; the momentum and the AdamW part are the shared foreach arithmetic of
:mod:`curvkit.optim._moments`. A step follows curvkit's step protocol: everything out of place,
ONE finiteness flag read (the only host sync), and only then the parameters and the state are
written, so a NaN never reaches either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..approx.matfun import newton_schulz
from ..errors import ArgumentError
from ..model import layers
from ..model.layers import matrix_shape
from ._base import CurvkitOptimizer, Staged, check_betas, check_number, check_positive_int, state_dtype
from ._moments import adam_denominator, adam_moments, decoupled_update, heavy_ball

SCALES = ("keller", "moonshot")


def update_scale(rows: int, cols: int, rule: str = "keller") -> float:
    """Factor on the orthogonalised ``(rows, cols)`` update (``rows`` the layer's outputs).
    ``"keller"`` (Jordan's rule): ``max(1, rows / cols) ** 0.5``, so that tall matrices get
    RMS-matched steps; ``"moonshot"`` (Liu et al. 2025): ``0.2 * max(rows, cols) ** 0.5``, which
    makes the update's RMS about AdamW's, so AdamW's learning rate and weight decay can be reused
    for the Muon weights."""
    return max(1.0, rows / cols) ** 0.5 if rule == "keller" else 0.2 * max(rows, cols) ** 0.5


def _as_matrix(u: Tensor, transposed: bool) -> Tensor:
    """A weight (or its update) as the ``(out, in)`` matrix: a conv kernel as ``(out, in*kh*kw)``,
    a weight stored ``(in, out)`` (``transposed``) as its transpose."""
    return u.transpose(-1, -2) if transposed else u.reshape(matrix_shape(u.shape))


def _from_matrix(O: Tensor, like: Tensor, transposed: bool) -> Tensor:
    return O.transpose(-1, -2) if transposed else O.reshape(like.shape)


def muon_directions(grads: list[Tensor], bufs: list[Tensor], *, momentum: float, nesterov: bool, ns_steps: int,
                    transposed: list[bool] | None = None) -> tuple[list[Tensor], list[tuple[list[int], Tensor]]]:
    r"""Muon's momentum and orthogonalised directions, OUT of place (nothing given is modified).

    ``b' = momentum * b + g``; ``u = g + momentum * b'`` (Nesterov) or ``u = b'``; each ``u`` seen
    as its ``(out, in)`` matrix (``transposed[i]``: stored ``(in, out)``); ``O = newton_schulz(u,
    ns_steps)`` for all same-shaped matrices in one batched call. Returns the new buffers and
    ``[(indices, O)]``, one entry per shape, ``O`` of shape ``(len(indices), out, in)``.
    ``grads`` and ``bufs`` share a dtype (float32 for bf16 models). Cost: 3 foreach calls, one
    stack per shape, and ``ns_steps * (4 m^2 n + 2 m^3)`` flops per ``m x n`` matrix (``m <= n``).
    """
    new = heavy_ball(bufs, grads, momentum)
    upd = torch._foreach_add(grads, new, alpha=momentum) if nesterov else new
    flags = transposed or [False] * len(upd)
    shapes: dict[tuple, list[int]] = {}
    mats = [_as_matrix(u, t) for u, t in zip(upd, flags)]
    for i, u in enumerate(mats):
        shapes.setdefault((tuple(u.shape), u.dtype, u.device), []).append(i)
    out = []
    for idx in shapes.values():
        G = torch.stack([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]].unsqueeze(0)
        out.append((idx, newton_schulz(G, ns_steps)))
    return new, out


def _directions(params: list[Tensor], directions: list[tuple[list[int], Tensor]], lr: float, scale: str,
                transposed: list[bool] | None) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """``(params, dirs, alphas)`` for :func:`decoupled_update`: each parameter's orthogonalised
    direction in its own layout and dtype, with ``-lr * update_scale``."""
    flags = transposed or [False] * len(params)
    ps, ds, alphas = [], [], []
    for idx, O in directions:
        a = -lr * update_scale(O.shape[1], O.shape[2], scale)
        O = O.to(state_dtype(params[idx[0]]))  # one cast per shape (bf16 from Newton-Schulz on CUDA)
        for j, i in enumerate(idx):
            ps.append(params[i])
            ds.append(_from_matrix(O[j], params[i], flags[i]))
            alphas.append(a)
    return ps, ds, alphas


def muon_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                scale: str = "keller", transposed: list[bool] | None = None) -> None:
    """The functional Muon step, in place on ``params`` and ``momentum_buffers``: ``p <- p (1 - lr
    weight_decay) - lr * update_scale * O`` with ``O`` from :func:`muon_directions`
    (``transposed[i]``: ``params[i]`` is stored ``(in, out)``). No NaN check: :class:`Muon`
    checks before writing. Cost: :func:`muon_directions` plus three foreach calls."""
    grads = [g.to(b.dtype) for g, b in zip(grads, momentum_buffers)]
    new, directions = muon_directions(grads, momentum_buffers, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, transposed=transposed)
    torch._foreach_copy_(momentum_buffers, new)
    ps, ds, alphas = _directions(params, directions, lr, scale, transposed)
    decoupled_update(ps, ds, lr, weight_decay, alphas=alphas)


def split_model(model: nn.Module, adamw_params: Any = None) -> list[dict]:
    """Param groups of a model: ``[{"use_muon": True, ...}, {"use_muon": False, ...}]``.

    AdamW: parameters with fewer than 2 dimensions, and the 2-D+ parameters named by
    ``adamw_params`` -- by default, by :func:`curvkit.model.layers`, the weights of the layers of
    kind "embedding" and of the LAST layer of kind "linear" in the model's parameter order
    (``nn.Linear`` or any module computing ``x W^T + b`` or ``x W + b``, as GPT-2's ``Conv1D``),
    taken to be the output head: true when the head is created last in ``__init__``; otherwise
    name it. A head tied to an embedding (GPT-2's) is the embedding's weight, already AdamW's; then
    no other layer is taken for it. A regex (``re.search`` on the parameter names) or an iterable
    of names/parameters replaces that rule. Muon: every other trainable parameter with 2+
    dimensions. Frozen parameters are left out. Cost: what :func:`curvkit.model.layers` costs (a
    tiny forward per module of unknown class holding a 2-D weight).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if adamw_params is None:
        by_name = dict(named)
        ls = layers(model, named)
        special = [by_name[n] for layer in ls if layer.kind == "embedding" for n in layer.param_names]
        linears = [layer for layer in ls if layer.kind == "linear" and layer.weight]
        tied_head = any(layer.kind == "embedding" and layer.tied for layer in ls)
        if linears and not tied_head:
            head = linears[-1]
            special += [by_name[n] for n, a in zip(head.param_names, head.attrs) if a == "weight"]
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


def transposed_weights(model: nn.Module) -> set[int]:
    """The ids of the model's weights stored ``(in, out)`` (layers of kind "linear" with
    ``transposed``, by :func:`curvkit.model.layers`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(named)
    return {id(by_name[n]) for layer in layers(model, named) if layer.transposed
            for n, a in zip(layer.param_names, layer.attrs) if a == "weight"}


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
    output head and every <2-D parameter go to AdamW; ``adamw_params=`` overrides; a weight
    stored as ``(in, out)``, as GPT-2's ``Conv1D``, is oriented as ``(out, in)`` for ``s``). Given
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

    @staticmethod
    def _check_group(g: dict) -> None:
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

    def __init__(self, params_or_model: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, scale: str = "keller", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0, adamw_params: Any = None):
        self._transposed: set[int] = set()
        if isinstance(params_or_model, nn.Module):
            params: Any = split_model(params_or_model, adamw_params)
            if not params:
                raise ArgumentError("the model has no trainable parameters")
            self._transposed = transposed_weights(params_or_model)
        elif adamw_params is not None:
            raise ArgumentError("adamw_params needs the model (Muon(model, ...)); with parameters, "
                                "pass param groups with use_muon=False instead")
        else:
            params = params_or_model
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        scale=scale, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                        adamw_weight_decay=adamw_weight_decay, use_muon=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; one without ``use_muon`` is split by dimension into a Muon group and an
        AdamW group. An AdamW group's ``lr``/``weight_decay`` default to ``adamw_lr``/
        ``adamw_weight_decay`` (the group's or the optimizer's)."""
        group = dict(param_group)
        self._check_group({**self.defaults, **group})
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
            self._check_group({**self.defaults, **g})  # before adding anything: a refused group leaves no trace
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
        loss = self._closure_loss(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._run_step(self._prepare, "the orthogonalised update", loss, grads)
        return loss

    def _prepare(self) -> Staged:
        new = Staged()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise ArgumentError("Muon does not support sparse gradients (nn.Embedding(sparse=True))")
            gs = [p.grad if p.grad.dtype == state_dtype(p) else p.grad.to(state_dtype(p)) for p in ps]
            sts = [self._staged_state(p, new) for p in ps]
            if group["use_muon"]:
                flags = [id(p) in self._transposed for p in ps]
                bufs = [st["momentum_buffer"] if "momentum_buffer" in st else torch.zeros_like(g)
                        for st, g in zip(sts, gs)]
                bufs, dirs = muon_directions(gs, bufs, momentum=group["momentum"], nesterov=group["nesterov"],
                                             ns_steps=group["ns_steps"], transposed=flags)
                dirs = [(idx, O.to(gs[idx[0]].dtype)) for idx, O in dirs]  # checked in the state dtype
                for st, b in zip(sts, bufs):
                    new.put(st, "momentum_buffer", b, check=False)  # finite where the directions are
                new.check += [O for _, O in dirs]
                targets, ds, alphas = _directions(ps, dirs, group["lr"], group["scale"], flags)
                new.move(targets, ds, lr=group["lr"], weight_decay=group["weight_decay"], alphas=alphas, check=False)
            else:
                b1, b2 = group["adamw_betas"]
                ea = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(g) for st, g in zip(sts, gs)]
                sq = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(g) for st, g in zip(sts, gs)]
                m, v = adam_moments(gs, ea, sq, b1, b2)
                steps = [st.get("step", 0) + 1 for st in sts]
                for st, t, mi, vi in zip(sts, steps, m, v):
                    new.put(st, "step", t)
                    new.put(st, "exp_avg", mi, check=False)
                    new.put(st, "exp_avg_sq", vi)  # b2 v + (1 - b2) g^2 is NaN/inf whenever the gradient is
                lr = group["lr"]
                # torch.optim.AdamW's foreach arithmetic, op for op: bit for bit its result
                new.move(ps, m, lr=lr, weight_decay=group["weight_decay"], denoms=adam_denominator(
                    v, steps, b2, group["adamw_eps"]), alphas=[(lr / (1 - b1**t)) * -1 for t in steps], check=False)
        return new
