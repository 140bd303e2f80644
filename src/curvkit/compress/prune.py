"""``compress.prune``: one entry point for every pruning method and pattern, and magnitude
pruning (the baseline every method is measured against)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, DataError, LossError, ModelError
from ..model.layers import Layer, layers
from ..model.params import ParamSpec, resolve_params
from .calibration import SUPPORTED, matrix_to_weight, set_weight_matrix, unsupported, weight_matrix
from .obs import check_pattern, obs_prune, weight_name
from .results import Pattern, PruneResult, parse_pattern

METHODS = ("magnitude", "obs", "mfac", "oba")


def select_targets(model: nn.Module, params: ParamSpec, names_from: nn.Module | None = None) -> list[Layer]:
    """The linear and conv2d layers of ``model`` whose weight ``params`` chooses (default: every
    such layer, frozen or not; other kinds are skipped). A layer chosen explicitly that layer-wise compression
    cannot handle is a ModelError naming the supported kinds. ``names_from``: the model ``params``
    refers to when ``model`` is a copy of it (tensors and sub-modules are matched by name)."""
    source = names_from if names_from is not None else model
    # params=None: every layer, frozen ones too (an inference model has requires_grad=False, and
    # layer-wise compression needs no gradients)
    names = ({n for n, _ in source.named_parameters()} if params is None
             else {n for n, _ in resolve_params(source, params)})
    named = [(n, p) for n, p in model.named_parameters() if n in names]
    chosen = [t for t in layers(model, named) if t.weight]
    if params is None:
        chosen = [t for t in chosen if unsupported(t) is None]
    else:
        for t in chosen:
            why = unsupported(t)
            if why is not None:
                raise ModelError(f"compression does not support {why}; it supports {SUPPORTED}. Choose other "
                                 "layers with params=")
    if not chosen:
        raise ModelError(f"params= selects no weight of a supported layer ({SUPPORTED}); choose some with params=")
    return chosen


def magnitude_prune(model: nn.Module, targets: list[Layer], loss_fn: Any = None, data: Any = None, *,
                    sparsity: float, pattern: Pattern, damping: Any = None, block_size: int = 128, seed: Any = 0,
                    progress: bool | None = None, max_batch: int | None = None,
                    scope: str = "layer") -> tuple[dict[str, Tensor], list[dict]]:
    """Zero the weights of least magnitude, in place: ``sparsity`` of each layer (``scope="layer"``)
    or of all targets together (``"global"``), or the ``m - n`` least of every ``m`` consecutive
    inputs of a row (n:m). ``loss_fn``, ``data``, ``damping``, ``block_size``, ``seed`` are not
    used (the method's contract). Cost: a sort of the weights; no pass over the data."""
    check_pattern(targets, pattern)
    mats = [weight_matrix(t).detach() for t in targets]
    keeps: list[Tensor] = []
    if pattern.kind == "n:m":
        for W in mats:
            g = W.abs().reshape(W.shape[0], -1, pattern.m)
            drop = torch.topk(g, pattern.m - pattern.n, dim=-1, largest=False).indices
            keeps.append(torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False).reshape(W.shape))
    elif scope == "global":
        flat = torch.cat([W.abs().reshape(-1).to(torch.float32) for W in mats])
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k:
            keep[torch.topk(flat, k, largest=False).indices] = False
        keeps = [c.reshape(W.shape) for c, W in zip(keep.split([W.numel() for W in mats]), mats)]
    else:
        for W in mats:
            k = round(sparsity * W.numel())
            keep = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
            if k:
                keep[torch.topk(W.abs().reshape(-1), k, largest=False).indices] = False
            keeps.append(keep.reshape(W.shape))
    masks, infos = {}, []
    for t, W, keep in zip(targets, mats, keeps):
        set_weight_matrix(t, torch.where(keep, W, torch.zeros_like(W)))
        masks[weight_name(t)] = matrix_to_weight(t, keep)
        kept = int(keep.sum())
        infos.append({"name": t.name, "shape": tuple(W.shape), "kept": kept, "total": keep.numel(),
                      "sparsity": 1 - kept / keep.numel()})
    return masks, infos


def _sparsity(sparsity: Any, pattern: Pattern) -> float:
    if pattern.kind == "n:m":
        if sparsity is None:
            return float(pattern.sparsity)
        if not isinstance(sparsity, (int, float)) or abs(float(sparsity) - pattern.sparsity) > 1e-9:
            raise ArgumentError(f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g} (keeps {pattern.n} of "
                                f"every {pattern.m}); got sparsity={sparsity!r}: leave sparsity out")
        return float(pattern.sparsity)
    if sparsity is None:
        raise ArgumentError("pass sparsity=, the fraction of weights to remove, in [0, 1) (e.g. sparsity=0.5)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise ArgumentError(f"sparsity must be a fraction in [0, 1) (the share of weights removed), got {sparsity!r}")
    return float(sparsity)


def prune(model: nn.Module, loss_fn: Any = None, data: Any = None, *, sparsity: float | None = None,
          method: str = "obs", pattern: str | Pattern = "unstructured", scope: str | None = None,
          params: ParamSpec = None, damping: Any = "auto", block_size: int = 128, window: int = 64,
          max_batch: int | None = None, max_matvecs: int | None = None, steps: int = 1, curvature: str = "hessian",
          inplace: bool = False, seed: Any = 0, progress: bool | None = None) -> PruneResult:
    r"""Prune ``model``'s linear and conv2d layers (a copy unless ``inplace=True``).

    Methods:
      - ``"magnitude"``: the weights of least ``|w|``; needs no data.
      - ``"obs"``: layer-wise Optimal Brain Surgeon on the layer's input second moment
        ``H = 2/N X^T X`` (SparseGPT/OBC), with the weight update; needs ``data`` (inputs; targets
        and ``loss_fn`` are not used), layers calibrated in sequence on the pruned model's inputs.
        ``damping``: ``"auto"`` (the smallest of ``0.01, 0.1, ...`` x ``mean(diag H)`` for which
        the Cholesky factor exists, reported per layer with the condition number) or a float.
      - ``"mfac"``: global OBS with M-FAC's sliding-window empirical Fisher (``window`` gradients;
        needs ``loss_fn`` and ``data``).
      - ``"oba"``: Optimal Brain Apoptosis, structured patterns only (``curvature`` "hessian" or
        "ggn").

    ``steps``: structured patterns only, the rounds of pruning, each re-scoring the groups left
    on the model the rounds before shrank (a geometric schedule of the kept fraction; ``steps``
    times the scoring cost; see :func:`~curvkit.compress.structured.prune_structured`).

    ``pattern``: ``"unstructured"``, ``"n:m"`` (keep ``n`` of every ``m`` consecutive inputs of a
    row; ``sparsity`` may be left out), or ``"channel"``/``"neuron"``/``"head"`` (structured: a
    smaller architecture, :func:`curvkit.compress.structured.prune_structured`). ``scope``:
    ``"layer"`` (each layer loses ``sparsity``: the default of magnitude and obs) or
    ``"global"`` (over all chosen layers: mfac's, and magnitude's on request). ``params``
    chooses the layers (names, a regular expression, a module, tensors; default every linear
    and conv2d layer).

    Returns a :class:`PruneResult`: pruned weights are stored zeros, so its
    ``model.state_dict()`` loads into the original architecture; ``masks`` and per-layer
    ``layers`` (``kept``, ``total``, ``sparsity``; obs: ``damping``, ``condition``, ``error``: the
    layer's output error ``1/2 tr(dW H dW^T)`` on the calibration data, computed directly, and
    ``error_damped``: the sweep's sum for the damped ``H``). ``sparsity`` is the one reached over
    the chosen layers.

    Cost: magnitude, a sort; obs, one pass over the data per group of layers sharing an input
    (forwards stopped after it) and ``O(out cols^2 + cols^3)`` per layer, memory ``cols^2`` per
    layer; mfac and oba, see their modules. Plus one copy of the model unless ``inplace``.

    Example:
        >>> import torch
        >>> from curvkit import compress
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(64, 8)
        >>> res = compress.prune(net, data=x, sparsity=0.5, method="obs")
        >>> res.sparsity, float((net[0].weight == 0).float().mean())  # the caller's model is unchanged
        (0.5, 0.0)
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    pat = parse_pattern(pattern)
    sp = _sparsity(sparsity, pat)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if scope not in (None, "layer", "global"):
        raise ArgumentError(f"scope must be 'layer', 'global' or None (the method's own), got {scope!r}")
    if curvature != "hessian" and method != "oba":
        raise ArgumentError(f"curvature={curvature!r} is an option of method='oba' (its Taylor model); "
                            f"method={method!r} does not use it")
    if pat.structured:
        if params is not None and not inplace:  # the copy does not hold the caller's tensors: choose by name
            params = [n for n, _ in resolve_params(model, params)]
        work = model if inplace else copy.deepcopy(model)
        from .structured import prune_structured

        res = prune_structured(work, loss_fn, data, sparsity=sp, pattern=pat, method=method, params=params,
                               scope=scope, curvature=curvature, steps=steps, seed=seed, progress=progress,
                               max_batch=max_batch, max_matvecs=max_matvecs, inplace=True)
        res.seconds = time.perf_counter() - t0
        return res
    if isinstance(steps, bool) or steps != 1:
        raise ArgumentError(f"steps={steps!r} (iterative pruning) is for the structured patterns (channel, neuron, "
                            "head); leave steps=1 for unstructured and n:m sparsity")
    if method == "oba":
        raise ArgumentError("method='oba' scores structured groups; use pattern='channel', 'neuron' or 'head' "
                            "(or method='obs' for unstructured and n:m sparsity)")
    scope = scope or ("global" if method == "mfac" else "layer")
    if method == "obs" and scope == "global":
        raise ArgumentError("method='obs' is layer-wise (each layer's own reconstruction loss): use scope='layer', "
                            "or method='mfac' for a global OBS")
    if method == "mfac" and scope == "layer":
        raise ArgumentError("method='mfac' is a global OBS over all chosen layers: use scope='global' (or "
                            "method='obs' for a layer-wise OBS)")
    if method in ("obs", "mfac") and data is None:
        raise DataError(f"method={method!r} needs calibration data: pass data= (or use method='magnitude')")
    if method == "mfac" and loss_fn is None:
        raise LossError("method='mfac' needs the loss (its Fisher is built from gradients): pass loss_fn=")
    work = model if inplace else copy.deepcopy(model)
    targets = select_targets(work, params, names_from=None if inplace else model)
    check_pattern(targets, pat)
    common = dict(sparsity=sp, pattern=pat, damping=damping, block_size=block_size, seed=seed, progress=progress,
                  max_batch=max_batch)
    if method == "magnitude":
        masks, infos = magnitude_prune(work, targets, loss_fn, data, scope=scope, **common)
    elif method == "obs":
        masks, infos = obs_prune(work, targets, loss_fn, data, **common)
    else:
        from .mfac import mfac_prune

        masks, infos = mfac_prune(work, targets, loss_fn, data, window=window, **common)
    kept, total = sum(i["kept"] for i in infos), sum(i["total"] for i in infos)
    return PruneResult(work, method, str(pat), 1 - kept / total, infos, masks, None, time.perf_counter() - t0)


__all__ = ["prune", "magnitude_prune", "select_targets", "METHODS"]
