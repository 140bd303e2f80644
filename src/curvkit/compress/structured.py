r"""Structured pruning: find the groups of weights that can be removed together, and shrink the
model to what is kept.

A **group** is one unit of a layer together with every weight that only exists for it:

- ``"neuron"``: a hidden unit between two linear layers, ``Linear -> (elementwise: activations,
  dropout) -> Linear``: the producer's output row and bias entry and the consumer's input column;
- ``"channel"``: a conv output channel, ``Conv2d -> (BatchNorm2d, activations, pooling) ->
  Conv2d`` or ``-> Flatten -> Linear``: the producer's filter and bias entry, the BatchNorm's
  entries (and running statistics), and the consumer's input channel or, through a Flatten, its
  block of ``H*W`` columns;
- ``"head"``: an attention head of attention written out as a fused ``qkv = Linear(d, 3k)`` whose
  output is viewed as ``(..., 3, heads, k // heads)`` and a ``proj = Linear(k, d)``, in a module
  holding the head count as an int attribute (``heads``, ``num_heads``, ``n_head`` or
  ``n_heads``): the head's q, k and v rows of ``qkv`` and its ``k // heads`` columns of ``proj``.
  The module's forward must take the head width from the layers' sizes (e.g.
  ``qkv.out_features // (3 * heads)``), not from the residual width, so that the pruned model
  runs; :func:`prune_structured` checks it. ``torch.nn.MultiheadAttention`` is refused (it
  derives the head width from ``embed_dim``, the residual width, so a head cannot be removed).

Units that feed a residual stream (an ``add`` with the block's input), a LayerNorm, a reshape
other than a Flatten, or anything but the ops above are **not** prunable: removing one would
change the other units or the residual width. So in a transformer only the MLP hidden units and
the attention heads are groups. Removing a group is exactly zeroing all of its weights (the
consumer's zeroed columns cut the unit out whatever the activation gives at 0), which
:func:`zero_groups` does and the tests check against :func:`apply_structure`.

Groups are found by tracing the model with :mod:`torch.fx` (factory calls such as
``torch.ones(T, T)`` on traced sizes are recorded, not evaluated).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ModelError
from ..model.params import ParamSpec, resolve_params
from ..seeding import generator
from .results import PruneResult, parse_pattern

KINDS = ("neuron", "channel", "head")
HEAD_ATTRS = ("heads", "num_heads", "n_head", "n_heads")

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                        nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.mish, F.hardtanh,
                          F.hardswish, F.dropout, torch.relu, torch.tanh, torch.sigmoid, F.sigmoid, F.tanh}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "eye", "tril", "triu")


@dataclass(frozen=True)
class Cut:
    """The slices of one module that a group set's units own: along ``dim`` (0: outputs, 1: inputs),
    unit ``u`` owns indices ``offset + u * width + j`` for every offset and ``j < width``."""

    module: str
    dim: int
    offsets: tuple[int, ...] = (0,)
    width: int = 1

    def indices(self, units: Tensor | list[int]) -> Tensor:
        u = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1, 1)
        off = torch.tensor(self.offsets, dtype=torch.long).reshape(1, -1, 1)
        return (off + u * self.width + torch.arange(self.width).reshape(1, 1, -1)).reshape(-1)


@dataclass
class GroupSet:
    """The groups of one layer: ``units`` groups of kind ``kind`` (neuron/channel/head) named after
    the producing module (``name``), each owning its slices of the modules in ``cuts``."""

    name: str
    kind: str
    units: int
    cuts: list[Cut]
    attention: tuple[str, str] | None = None  # (module, attribute) holding the head count

    def members(self, model: nn.Module) -> list[tuple[str, int, Cut]]:
        """``(parameter name, dim, cut)`` of every parameter slice the groups own."""
        out = []
        for cut in self.cuts:
            mod = model.get_submodule(cut.module)
            prefix = cut.module + "." if cut.module else ""
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if isinstance(p, nn.Parameter) and (attr == "weight" or cut.dim == 0):
                    out.append((prefix + attr, cut.dim, cut))
        return out


# ------------------------------------------------------------------------------------------ tracing
@contextlib.contextmanager
def _recorded_factories():
    """``torch.ones(T, T)`` with traced sizes becomes a graph node instead of failing."""
    saved = {f: getattr(torch, f) for f in _FACTORIES}

    def wrap(orig):
        def factory(*args, **kwargs):
            proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", orig, args, kwargs)
            return orig(*args, **kwargs)
        return factory

    for name, orig in saved.items():
        setattr(torch, name, wrap(orig))
    try:
        yield
    finally:
        for name, orig in saved.items():
            setattr(torch, name, orig)


def trace(model: nn.Module) -> fx.Graph:
    """The model's :mod:`torch.fx` graph (torch.nn layers are leaves). Raises ModelError naming
    what did not trace."""
    try:
        with _recorded_factories():
            return fx.Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... from user code
        raise ModelError(
            f"structured pruning traces the model with torch.fx and could not: {type(e).__name__}: {e}. "
            "Data-dependent control flow (an `if` on a tensor's value) and non-torch calls on traced values do "
            "not trace; write them with torch ops, or prune the sub-module that holds the layers (params=)") from e


def _where(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"node {node.name!r} (module {node.target!r}, {type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", node.target)
    return f"node {node.name!r} ({node.op} {target})"


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _follow(node: fx.Node, kind: str, modules: dict[str, nn.Module], calls: dict[str, int],
            channels: int) -> tuple[list[Cut], str | None]:
    """The cuts downstream of a producer's output (norms and consumers), or a reason why its units
    cannot be removed."""
    cuts: list[Cut] = []
    stack = [(node, False)]
    seen: set[fx.Node] = set()
    while stack:
        cur, flat = stack.pop()
        if not cur.users:
            return [], f"its output {_where(cur, modules)} is not used"
        for u in cur.users:
            if u in seen:
                continue
            seen.add(u)
            if u.args[:1] != (cur,) or any(a is cur for a in (*u.args[1:], *u.kwargs.values())):
                return [], f"{_where(u, modules)} takes it as more than a first argument (a residual or a mix)"
            mod = modules.get(u.target) if u.op == "call_module" else None
            if mod is not None and calls[u.target] > 1:
                return [], f"module {u.target!r} is called more than once (shared)"
            if isinstance(mod, nn.Linear) and (kind == "neuron" or flat):
                if mod.in_features % channels:
                    return [], f"{_where(u, modules)} has {mod.in_features} inputs, not a multiple of {channels}"
                cuts.append(Cut(u.target, 1, (0,), mod.in_features // channels))
                continue
            if isinstance(mod, nn.Conv2d) and kind == "channel" and not flat:
                if mod.groups != 1:
                    return [], f"{_where(u, modules)} is a grouped convolution"
                cuts.append(Cut(u.target, 1))
                continue
            elementwise = (isinstance(mod, _ELEMENTWISE_MODULES)
                           or (u.op == "call_function" and u.target in _ELEMENTWISE_FUNCTIONS)
                           or (u.op == "call_method" and u.target in _ELEMENTWISE_METHODS))
            if elementwise:
                stack.append((u, flat))
                continue
            if kind == "channel" and not flat:
                if isinstance(mod, nn.BatchNorm2d):
                    cuts.append(Cut(u.target, 0))
                    stack.append((u, flat))
                    continue
                if isinstance(mod, _POOL_MODULES) or (u.op == "call_function" and u.target in _POOL_FUNCTIONS):
                    stack.append((u, flat))
                    continue
                start = (mod.start_dim if isinstance(mod, nn.Flatten) else
                         (list(u.args[1:2]) or [u.kwargs.get("start_dim", 0)])[0]
                         if (u.op == "call_function" and u.target is torch.flatten)
                         or (u.op == "call_method" and u.target == "flatten") else None)
                if start == 1 and (not isinstance(mod, nn.Flatten) or mod.end_dim == -1):
                    stack.append((u, True))
                    continue
            return [], f"it feeds {_where(u, modules)}, which mixes units (supported between two layers: " \
                       "activations, dropout" + (", BatchNorm2d, pooling, Flatten" if kind == "channel" else "") + ")"
    if not cuts:
        return [], "no consumer layer follows"
    return cuts, None


def _heads(graph: fx.Graph, model: nn.Module, modules: dict[str, nn.Module]) -> tuple[list[GroupSet], list[str]]:
    sets, skipped = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            skipped.append(f"{name!r} is a torch.nn.MultiheadAttention: its head width is embed_dim // num_heads "
                           "(the residual width), so a head cannot be removed; write the attention out "
                           "(a qkv Linear(d, 3d) and a proj Linear(d, d)) to prune heads")
            continue
        attr = next((a for a in HEAD_ATTRS if isinstance(getattr(mod, a, None), int)
                     and not isinstance(getattr(mod, a), bool)), None)
        if attr is None:
            continue
        heads = getattr(mod, attr)
        prefix = name + "." if name else ""
        lin = [(n, m) for n, m in mod.named_children() if isinstance(m, nn.Linear)]
        fused = [(n, m) for n, m in lin if m.out_features % 3 == 0 and (m.out_features // 3) % heads == 0]
        found = False
        for qn, qkv in fused:
            k = qkv.out_features // 3
            for pn, proj in lin:
                if pn == qn or proj.in_features != k:
                    continue
                reason = _attention_path(graph, prefix + qn, prefix + pn, heads, modules)
                if reason:
                    skipped.append(f"heads of {name!r}: {reason}")
                    continue
                hd = k // heads
                cuts = [Cut(prefix + qn, 0, (0, k, 2 * k), hd), Cut(prefix + pn, 1, (0,), hd)]
                sets.append(GroupSet(prefix + qn, "head", heads, cuts, attention=(name, attr)))
                found = True
                break
            if found:
                break
        if not found and not fused:
            skipped.append(f"heads of {name!r}: no child Linear(d, 3k) with 3k divisible by 3 * {attr}={heads}")
    return sets, skipped


def _attention_path(graph: fx.Graph, qkv: str, proj: str, heads: int, modules) -> str | None:
    """Why ``qkv``'s output is not split into ``heads`` heads that only ``proj`` reads, or None."""
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target in (qkv, proj)]
    if [n.target for n in nodes].count(qkv) != 1 or [n.target for n in nodes].count(proj) != 1:
        return f"{qkv!r} and {proj!r} must each be called once"
    start = next(n for n in nodes if n.target == qkv)
    views = [u for u in start.users if u.op == "call_method" and u.target in ("view", "reshape")]
    if len(start.users) != 1 or not views or list(views[0].args[-3:-1]) != [3, heads]:
        return (f"{qkv!r}'s output must be viewed as (..., 3, {heads}, head_dim) (q, k, v then heads) and used "
                "nowhere else")
    stack, seen, reached = [start], set(), False
    while stack:
        cur = stack.pop()
        for u in cur.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module" and u.target == proj:
                reached = True
            elif u.op == "output" or (u.op == "call_module" and isinstance(modules[u.target], (nn.Linear, nn.Conv2d))):
                return f"{qkv!r}'s output reaches {_where(u, modules)} before {proj!r}"
            else:
                stack.append(u)
    return None if reached else f"{qkv!r}'s output never reaches {proj!r}"


def find_groups(model: nn.Module, kind: str, params: ParamSpec = None) -> list[GroupSet]:
    """The group sets of ``kind`` ("neuron", "channel" or "head") in ``model``, one per producing
    layer, restricted to the producers among the layers that hold ``params`` (default: all).

    Cost: one symbolic trace (no data). Raises ModelError when the model does not trace or holds
    no such group (it says why each candidate layer was refused).
    """
    if kind not in KINDS:
        raise ArgumentError(f"structured pruning groups are {', '.join(KINDS)}, got {kind!r}")
    graph = trace(model)
    modules = dict(model.named_modules())
    chosen = {n.rpartition(".")[0] for n, _ in resolve_params(model, params)}
    calls = _module_calls(graph)
    sets: list[GroupSet] = []
    skipped: list[str] = []
    if kind == "head":
        found, skipped = _heads(graph, model, modules)
        sets = [s for s in found if s.name in chosen]
    else:
        want = nn.Linear if kind == "neuron" else nn.Conv2d
        for node in graph.nodes:
            mod = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(mod, want) or node.target not in chosen:
                continue
            units = mod.out_features if kind == "neuron" else mod.out_channels
            if calls[node.target] > 1:
                skipped.append(f"{node.target!r}: called more than once (shared)")
                continue
            if kind == "channel" and mod.groups != 1:
                skipped.append(f"{node.target!r}: a grouped convolution")
                continue
            cuts, reason = _follow(node, kind, modules, calls, units)
            if reason:
                skipped.append(f"{node.target!r}: {reason}")
                continue
            sets.append(GroupSet(node.target, kind, units, [Cut(node.target, 0)] + cuts))
    if not sets:
        why = "; ".join(skipped) if skipped else f"the model has no {kind} groups among the chosen layers"
        raise ModelError(f"no prunable {kind} groups: {why}. {_SUPPORTED}")
    return sets


_SUPPORTED = ("Supported: 'neuron' = Linear -> activations/dropout -> Linear; 'channel' = Conv2d -> "
              "BatchNorm2d/activations/pooling -> Conv2d or -> Flatten -> Linear; 'head' = a module with an int "
              "`heads` attribute, a fused qkv Linear(d, 3k) viewed as (..., 3, heads, k/heads) and a proj "
              "Linear(k, d)")


# ------------------------------------------------------------------------------------------ shrinking
def _complement(n: int, removed: set[int]) -> list[int]:
    return [i for i in range(n) if i not in removed]


def structure_of(model: nn.Module, sets: list[GroupSet], removed: dict[str, list[int]]) -> dict:
    """The JSON-able structure (see :func:`apply_structure`) that removes ``removed[set.name]``
    (unit indices) of each group set."""
    cut_idx: dict[tuple[str, int], set[int]] = {}
    heads: dict[str, dict] = {}
    for s in sets:
        units = removed.get(s.name, [])
        if not units:
            continue
        for cut in s.cuts:
            cut_idx.setdefault((cut.module, cut.dim), set()).update(cut.indices(units).tolist())
        if s.attention:
            mod, attr = s.attention
            heads[mod] = {"kind": "attention", "attr": attr, "heads": s.units - len(units)}
    out: dict[str, dict] = {}
    for (name, dim), idx in sorted(cut_idx.items()):
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Linear):
            e = out.setdefault(name, {"kind": "linear", "in_features": mod.in_features,
                                      "out_features": mod.out_features, "kept_in": None, "kept_out": None})
            size = mod.out_features if dim == 0 else mod.in_features
        elif isinstance(mod, nn.Conv2d):
            e = out.setdefault(name, {"kind": "conv2d", "in_channels": mod.in_channels,
                                      "out_channels": mod.out_channels, "kept_in": None, "kept_out": None})
            size = mod.out_channels if dim == 0 else mod.in_channels
        else:
            e = out.setdefault(name, {"kind": "batchnorm", "num_features": mod.num_features, "kept": None})
            e["kept"] = _complement(mod.num_features, idx)
            e["num_features"] = len(e["kept"])
            continue
        kept = _complement(size, idx)
        e["kept_out" if dim == 0 else "kept_in"] = kept
        e[{("linear", 0): "out_features", ("linear", 1): "in_features", ("conv2d", 0): "out_channels",
           ("conv2d", 1): "in_channels"}[e["kind"], dim]] = len(kept)
    out.update(heads)
    return out


def _take(t: Tensor | None, dim: int, kept: list[int] | None) -> Tensor | None:
    if t is None or kept is None:
        return t
    return t.index_select(dim, torch.as_tensor(kept, dtype=torch.long, device=t.device))


def _check_kept(name: str, kept: list[int] | None, size: int) -> None:
    if kept is not None and kept and max(kept) >= size:
        raise ModelError(f"structure entry {name!r} keeps index {max(kept)} of a module with {size}; apply a "
                         "structure to a fresh instance of the architecture it was made from (not one shrunk already)")


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Shrink ``model`` in place to ``structure`` and return it.

    ``structure`` maps a module name to its new form: ``{"kind": "linear", "in_features",
    "out_features", "kept_in", "kept_out"}``, ``{"kind": "conv2d", "in_channels", "out_channels",
    "kept_in", "kept_out"}``, ``{"kind": "batchnorm", "num_features", "kept"}`` (kept index lists
    of the original module, ``None`` = all) or ``{"kind": "attention", "attr", "heads"}`` (the
    head count attribute set). Each listed layer is replaced by a new module of its class and the
    kept sizes, holding the kept slices of the module's weights, buffers and options, so a pruned
    ``state_dict`` then loads with ``strict=True`` (:meth:`PruneResult.rebuild`).
    Cost: a copy of the kept weights; no data.
    """
    for name, e in structure.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError as err:
            raise ModelError(f"structure names module {name!r}, which the model does not have; rebuild a fresh "
                             "instance of the architecture that was pruned") from err
        kind = e.get("kind")
        if kind == "attention":
            setattr(mod, e["attr"], int(e["heads"]))
            continue
        opts = dict(device=next(iter(mod.parameters()), torch.empty(0)).device,
                    dtype=next(iter(mod.parameters()), torch.empty(0)).dtype)
        if kind == "linear" and isinstance(mod, nn.Linear):
            _check_kept(name, e["kept_out"], mod.out_features)
            _check_kept(name, e["kept_in"], mod.in_features)
            new = type(mod).__new__(type(mod))
            nn.Linear.__init__(new, e["in_features"], e["out_features"], bias=mod.bias is not None, **opts)
            w = _take(_take(mod.weight.data, 0, e["kept_out"]), 1, e["kept_in"])
            b = _take(mod.bias.data, 0, e["kept_out"]) if mod.bias is not None else None
        elif kind == "conv2d" and isinstance(mod, nn.Conv2d):
            _check_kept(name, e["kept_out"], mod.out_channels)
            _check_kept(name, e["kept_in"], mod.in_channels)
            new = type(mod).__new__(type(mod))
            nn.Conv2d.__init__(new, e["in_channels"], e["out_channels"], mod.kernel_size, stride=mod.stride,
                               padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                               bias=mod.bias is not None, padding_mode=mod.padding_mode, **opts)
            w = _take(_take(mod.weight.data, 0, e["kept_out"]), 1, e["kept_in"])
            b = _take(mod.bias.data, 0, e["kept_out"]) if mod.bias is not None else None
        elif kind == "batchnorm" and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            _check_kept(name, e["kept"], mod.num_features)
            new = type(mod).__new__(type(mod))
            type(mod).__init__(new, e["num_features"], eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                               track_running_stats=mod.track_running_stats, **opts)
            for buf in ("running_mean", "running_var"):
                if getattr(mod, buf, None) is not None:
                    getattr(new, buf).copy_(_take(getattr(mod, buf), 0, e["kept"]))
            if mod.track_running_stats:
                new.num_batches_tracked.copy_(mod.num_batches_tracked)
            w = _take(mod.weight.data, 0, e["kept"]) if mod.affine else None
            b = _take(mod.bias.data, 0, e["kept"]) if mod.affine else None
        else:
            raise ModelError(f"structure entry {name!r} is a {kind!r} but the module is a {type(mod).__name__}; "
                             "apply it to the architecture it was made from")
        with torch.no_grad():
            if w is not None:
                new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        for attr in ("weight", "bias"):  # a frozen layer stays frozen
            if isinstance(getattr(new, attr, None), nn.Parameter):
                getattr(new, attr).requires_grad_(getattr(mod, attr).requires_grad)
        new.train(mod.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


@torch.no_grad()
def zero_groups(model: nn.Module, sets: list[GroupSet], removed: dict[str, list[int]]) -> nn.Module:
    """Zero, in place, every weight the ``removed`` units own (the masked model that
    :func:`apply_structure` makes smaller; BatchNorm channels are zeroed through their weight and
    bias). Returns ``model``."""
    params = dict(model.named_parameters())
    for s in sets:
        units = removed.get(s.name, [])
        if units:
            for pname, dim, cut in s.members(model):
                params[pname].index_fill_(dim, cut.indices(units).to(params[pname].device), 0.0)
    return model


def group_indices(model: nn.Module, sets: list[GroupSet], names: list[str]) -> list[Tensor]:
    """Per group (set by set, unit by unit), the flat indices of its weights in the concatenation of
    the parameters ``names`` (in that order); slices of parameters not in ``names`` are left out."""
    params = dict(model.named_parameters())
    start, offset = {}, 0
    for n in names:
        start[n] = offset
        offset += params[n].numel()
    out = []
    for s in sets:
        members = [(p, d, c) for p, d, c in s.members(model) if p in start]
        for u in range(s.units):
            parts = []
            for pname, dim, cut in members:
                p = params[pname]
                idx = torch.zeros(p.shape, dtype=torch.bool)
                idx.index_fill_(dim, cut.indices([u]), True)
                parts.append(start[pname] + idx.reshape(-1).nonzero().reshape(-1))
            out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
    return out


def magnitude_scores(model: nn.Module, sets: list[GroupSet]) -> list[Tensor]:
    """Per group set, each unit's L2 norm over all the weights it owns (every layer it touches).
    Cost: a read of those weights."""
    params = dict(model.named_parameters())
    scores = []
    for s in sets:
        sq = torch.zeros(s.units, dtype=torch.float64)
        for pname, dim, cut in s.members(model):
            p = params[pname].detach().to(torch.float64).cpu()
            per = p.movedim(dim, 0).reshape(p.shape[dim], -1).square().sum(1)  # per index along dim
            idx = cut.indices(torch.arange(s.units)).reshape(s.units, -1)
            sq += per[idx].sum(1)
        scores.append(sq.sqrt())
    return scores


def select_groups(scores: list[Tensor], sets: list[GroupSet], sparsity: float, scope: str = "layer") -> dict[str, list[int]]:
    """The units to remove (``{set name: unit indices}``) given per-set ``scores``: the lowest scores, ``round(sparsity * units)`` per set ("layer") or over all
    sets ("global"); at least one unit of every set is kept."""
    if scope == "layer":
        return _lowest(scores, sets, counts=[min(int(round(sparsity * s.units)), s.units - 1) for s in sets])
    return _lowest(scores, sets, total=int(round(sparsity * sum(s.units for s in sets))))


def _lowest(scores: list[Tensor], sets: list[GroupSet], counts: list[int] | None = None,
            total: int | None = None) -> dict[str, list[int]]:
    """The ``counts[i]`` lowest-scored units of each set, or the ``total`` lowest over all sets
    (each set keeping at least one unit; fewer are removed when that binds)."""
    removed: dict[str, list[int]] = {}
    if counts is not None:
        for s, sc, k in zip(sets, scores, counts):
            removed[s.name] = sorted(torch.argsort(sc, stable=True)[:k].tolist())
        return removed
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((s.units,), i) for i, s in enumerate(sets)])
    unit = torch.cat([torch.arange(s.units) for s in sets])
    left = [s.units for s in sets]
    for j in torch.argsort(flat, stable=True).tolist():
        if total == 0:
            break
        i = int(owner[j])
        if left[i] > 1:
            left[i] -= 1
            removed.setdefault(sets[i].name, []).append(int(unit[j]))
            total -= 1
    return {k: sorted(v) for k, v in removed.items()}


def schedule(sparsity: float, steps: int) -> list[float]:
    r"""The cumulative fraction of the groups removed after each of ``steps`` rounds: geometric in
    the kept fraction, :math:`1 - (1 - s)^{r / \text{steps}}`, so every round removes the same
    share of the groups still there, so each round's perturbation is alike relative to the model
    it is scored on (a linear schedule in the sparsity removes an ever larger share of what is
    left: at 75% in 4 rounds, 19%, 23%, 30%, then 43%; this one 29% every round)."""
    return [1 - (1 - sparsity) ** (r / steps) for r in range(1, steps + 1)]


def _same_sets(found: list[GroupSet], names: list[str]) -> list[GroupSet]:
    """The sets of a shrunk model named ``names`` (a round of iterative pruning), in that order."""
    by_name = {s.name: s for s in found}
    missing = [n for n in names if n not in by_name]
    if missing:  # the shrunk architecture must keep every group set: a bug if not
        raise ModelError(f"after shrinking, the group sets {missing} are no longer found; prune in one round "
                         "(steps=1) and report this model")
    return [by_name[n] for n in names]


def _first_inputs(data: Any):
    if data is None:
        return None
    if isinstance(data, Tensor):  # inputs alone (what magnitude pruning may be given)
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0]
    for batch in data:
        return batch[0]
    return None


def prune_structured(model: nn.Module, loss_fn: Any = None, data: Any = None, *, sparsity: float,
                     pattern: Any = "neuron", method: str = "oba", params: ParamSpec = None,
                     scope: str | None = "layer", curvature: str = "hessian", steps: int = 1, seed: Any = 0,
                     progress: bool | None = None, max_batch: int | None = None, max_matvecs: int | None = None,
                     inplace: bool = False) -> PruneResult:
    """Remove a fraction of the neuron, channel or head groups (see the module docstring) and
    shrink the model to the rest.

    ``sparsity``: the fraction of groups removed, per layer (``scope="layer"`` or None: ``round(sparsity *
    units)`` of each layer, at least one unit kept) or over all the layers at once
    (``scope="global"``: the lowest scores wherever they are; comparable across layers only for
    ``"oba"``, whose scores are loss changes). ``method``: ``"magnitude"`` (the group's L2 norm over
    all its weights) or ``"oba"`` (Optimal Brain Apoptosis: the second-order Taylor change of the
    loss from removing the group, :func:`curvkit.compress.oba.oba_scores`, with ``curvature``
    "hessian" or "ggn", exact or randomized under ``max_matvecs``).

    ``steps``: the rounds in which the groups are removed. ``1``: one shot, every group scored once
    on the given model. ``k > 1``: after round ``r`` a cumulative ``1 - (1 - sparsity)^(r/k)`` of
    each layer's groups (of all groups, ``scope="global"``) is gone (:func:`schedule`: each round
    removes the same share of what is left), and every round re-scores the remaining groups on the
    model shrunk by the rounds before, so a score is a Taylor expansion about the model it is
    applied to rather than about the dense one. The last round reaches exactly the one-shot counts
    (per layer, or in total for ``"global"``); the returned ``structure`` is relative to the
    original model, so :meth:`PruneResult.rebuild` still rebuilds a fresh original instance.

    Returns a :class:`PruneResult` whose ``model`` is the smaller model (a copy unless
    ``inplace=True``), ``structure`` what :func:`apply_structure` needs to rebuild it from a fresh
    instance, and ``layers`` per group set its name, kind, shape, kept/total units, sparsity,
    the removed units (original indices), ``removed_per_round`` and ``score_removed`` (the sum of
    the removed units' scores, each from the round that removed it). When data is given, the
    smaller model's outputs on the first batch are checked against the masked model's
    (ModelError if a forward hard-codes a pruned size).

    Cost: ``steps`` times the scoring cost at most, on ever smaller models (a round the schedule
    gives nothing to remove, as with a few units per layer, is skipped). "magnitude": no data (one
    forward for the check). "oba": per round one gradient pass, and ``S`` Hessian-vector products
    (S = number of groups still there, in blocks of 32 probes) or ``max_matvecs`` of them when
    ``max_matvecs < S`` (the budget is per round). Memory: a copy of the model for the check (and,
    for ``steps > 1``, one for the round's shrunk model); the model's parameters times the probe
    block for the products.
    """
    t0 = time.perf_counter()
    pat = parse_pattern(pattern)
    if not pat.structured:
        raise ArgumentError(f"prune_structured takes a structured pattern ({', '.join(KINDS)}), got {str(pat)!r}")
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1 or isinstance(sparsity, bool):
        raise ArgumentError(f"sparsity must be a fraction of the groups in [0, 1), got {sparsity!r}")
    if method not in ("magnitude", "oba"):
        raise ArgumentError(f"structured pruning methods are 'magnitude' and 'oba', got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ArgumentError(f"steps must be a positive int (the rounds of pruning, each re-scoring the groups "
                            f"left; 1 = one shot), got {steps!r}")
    scope = "layer" if scope is None else scope
    if scope not in ("layer", "global"):
        raise ArgumentError(f"scope must be 'layer' or 'global', got {scope!r}")
    if method == "oba" and (loss_fn is None or data is None):
        raise ArgumentError("method='oba' needs loss_fn and data (the loss whose Taylor expansion scores the "
                            "groups); method='magnitude' needs neither")
    if params is not None:  # the caller's tensors or modules do not resolve on a copy: names do
        params = [n for n, _ in resolve_params(model, params)]
    if not inplace:
        model = copy.deepcopy(model)
    sets = find_groups(model, pat.kind, params)
    gen = None
    if method == "oba":
        from .oba import oba_scores

        gen = generator(seed)  # one stream over the rounds (steps=1: the stream oba_scores would draw)
    units0 = {s.name: s.units for s in sets}
    final = [min(int(round(sparsity * s.units)), s.units - 1) for s in sets]
    final_total = int(round(sparsity * sum(units0.values())))
    cumulative = schedule(float(sparsity), steps)
    removed: dict[str, list[int]] = {s.name: [] for s in sets}
    per_round: dict[str, list[int]] = {s.name: [] for s in sets}
    score_removed = {s.name: 0.0 for s in sets}
    extra: dict[str, dict] = {s.name: {} for s in sets}
    for r in range(steps):
        last = r == steps - 1
        if scope == "layer":  # this round's removals follow from the schedule alone, not from the scores
            counts = [(k if last else min(k, int(round(cumulative[r] * units0[s.name])))) - len(removed[s.name])
                      for s, k in zip(sets, final)]
            want = sum(counts)
        else:
            goal = final_total if last else int(round(cumulative[r] * sum(units0.values())))
            want = max(0, goal - sum(len(v) for v in removed.values()))
        if want == 0 and steps > 1:  # a round that removes nothing (few units per layer) is not scored
            for s in sets:
                per_round[s.name].append(0)
            continue
        if r == 0:
            cur, cur_sets = model, sets
        else:  # the original shrunk by every round so far: the structure stays relative to the original
            cur = apply_structure(copy.deepcopy(model), structure_of(model, sets, removed))
            # the producers by their weights' names (a frozen layer's too): specs holding tensors or
            # modules of the original do not resolve on the copy
            cur_sets = _same_sets(find_groups(cur, pat.kind, [f"{s.name}.weight" for s in sets]),
                                  [s.name for s in sets])
        if method == "magnitude":
            scores = magnitude_scores(cur, cur_sets)
        else:
            res = oba_scores(cur, loss_fn, data, cur_sets, curvature=curvature, max_matvecs=max_matvecs, seed=gen,
                             max_batch=max_batch, progress=progress)
            scores = res.scores
            for i, s in enumerate(cur_sets):
                e = extra[s.name]
                e["exact"] = e.get("exact", True) and res.exact
                e["matvecs"] = e.get("matvecs", 0) + res.matvecs
                e["stderr_max"] = max(e.get("stderr_max", 0.0),
                                      float(res.stderr[i].max()) if res.stderr is not None else 0.0)
        chosen = _lowest(scores, cur_sets, counts=counts) if scope == "layer" else \
            _lowest(scores, cur_sets, total=want)
        for s, sc in zip(cur_sets, scores):
            units = chosen.get(s.name, [])
            alive = _complement(units0[s.name], set(removed[s.name]))  # current unit j = original alive[j]
            removed[s.name] = sorted(removed[s.name] + [alive[u] for u in units])
            per_round[s.name].append(len(units))
            score_removed[s.name] += float(sc[units].sum()) if units else 0.0
        del cur
    structure = structure_of(model, sets, removed)
    x = _first_inputs(data)
    masked_out = None
    if x is not None:
        # the check runs in eval mode: in train mode dropout would differ between the two forwards
        # and BatchNorm would fold the check batch into the returned model's running statistics
        with torch.no_grad():
            masked_out = zero_groups(copy.deepcopy(model), sets, removed).eval()(x)
    apply_structure(model, structure)
    if masked_out is not None:
        modes = {m: m.training for m in model.modules()}
        model.eval()
        with torch.no_grad():
            try:
                out = model(x)
            except RuntimeError as e:
                raise ModelError(f"the pruned model does not run ({e}); its forward must take sizes from the "
                                 "layers (e.g. a head width qkv.out_features // (3 * heads)), not constants") from e
            finally:
                for m, t in modes.items():
                    m.training = t
        scale = masked_out.abs().max().clamp_min(1.0)
        tol = 1e-4 if masked_out.dtype in (torch.float32, torch.float64) else 1e-2
        if out.shape != masked_out.shape or (out - masked_out).abs().max() > tol * scale:
            raise ModelError("the pruned model's outputs differ from the masked model's: its forward uses a size "
                             "that pruning changed (e.g. a head width computed from the residual width); compute it "
                             "from the layers' sizes")
    layers = []
    for s in sets:
        r = removed[s.name]
        layers.append({"name": s.name, "kind": s.kind, "shape": [s.units], "kept": s.units - len(r),
                       "total": s.units, "sparsity": len(r) / s.units, "removed": r,
                       "removed_per_round": per_round[s.name], "score_removed": score_removed[s.name],
                       **extra[s.name]})
    total = sum(s.units for s in sets)
    return PruneResult(model=model, method=method, pattern=pat.kind,
                       sparsity=sum(len(v) for v in removed.values()) / total, layers=layers,
                       structure=structure, seconds=time.perf_counter() - t0)


__all__ = ["Cut", "GroupSet", "find_groups", "trace", "apply_structure", "structure_of", "zero_groups",
           "group_indices", "magnitude_scores", "select_groups", "schedule", "prune_structured", "KINDS"]
