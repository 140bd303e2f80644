r"""Global Optimal Brain Surgeon pruning with the M-FAC inverse empirical Fisher (WoodFisher,
Singh & Alistarh 2020; M-FAC, Frantar et al. 2021): ``compress.prune(method="mfac")``.

Over all target layers' weights at once (``scope="global"``), with ``F`` the M-FAC Fisher of a
window of per-example gradients (:func:`curvkit.approx.mfac.mfac`):

- the OBS saliency of weight ``q`` is ``w_q^2 / (2 [F^-1]_qq)`` (the loss increase the
  quadratic model predicts when ``q`` alone is removed and the others compensate);
- the ``sparsity * d`` lowest are pruned, whichever layer they are in (n:m: the lowest of every
  group, per row);
- ``update=True``: the one-shot update of the pruned set ``P`` as if its weights were
  independent, ``delta = -F^-1 sum_{q in P} e_q w_q / [F^-1]_qq`` (WoodFisher's one-shot
  form; one product with ``F^-1``), then the pruned weights set to exactly 0. Not the
  gradual/iterative variant (no retraining or recomputed gradients between steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..approx.mfac import MFACOperator, mfac
from ..errors import ArgumentError, ModelError
from ..model.layers import Layer
from .results import Pattern, parse_pattern

SUPPORTED = ("linear", "conv2d")


def _weight_name(layer: Layer) -> str:
    return f"{layer.name}.weight" if layer.name else "weight"


def _rows(layer: Layer, w: Tensor) -> Tensor:
    """The weight as ``(out, inputs)``: a row per output, its inputs consecutive (n:m groups)."""
    return w.T if layer.transposed else w.reshape(w.shape[0], -1)


def _nm_mask(layer: Layer, scores: Tensor, pattern: Pattern) -> Tensor:
    w = layer.module.weight
    R = _rows(layer, scores.view_as(w))
    if R.shape[1] % pattern.m:
        raise ArgumentError(f"layer {layer.name!r} has rows of {R.shape[1]} inputs, which {pattern} cannot cut into "
                            f"groups of {pattern.m}; leave it out with params= or use pattern='unstructured'")
    groups = R.reshape(R.shape[0], -1, pattern.m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(pattern.n, dim=-1).indices, True)
    keep = keep.reshape(R.shape)
    return (keep.T if layer.transposed else keep.reshape(w.shape)).reshape(-1)


def mfac_prune(model: nn.Module, targets: list[Layer], loss_fn: Any, data: Any, *, sparsity: float | None,
               pattern: Any = "unstructured", damping: float | str = "auto", block_size: int = 128,
               seed: int | torch.Generator | None = 0, progress: Any = None, max_batch: int | None = None,
               window: int = 64, blocks: int | None = None,
               update: bool = True) -> tuple[dict[str, Tensor], list[dict]]:
    r"""Prune the target layers' weights of ``model`` IN PLACE (the caller's copy) by global OBS
    with the M-FAC inverse Fisher; returns ``(masks, infos)``: a bool keep-mask per weight name
    (the weight's shape) and one dict per layer (name, shape, kept, total, sparsity,
    ``predicted_dloss``: the sum of its pruned weights' saliencies).

    ``window``: the number of per-example gradients (the first ``window`` examples of ``data``);
    ``blocks``: the blocked M-FAC's block size (None: one dense window over all target weights).
    ``damping``: added to the Fisher's diagonal; ``"auto"`` is ``1e-3`` times the mean of the
    windowed Fisher's diagonal (the mean squared gradient entry), so it scales with the loss.
    ``sparsity`` is global over all targets (exactly ``round(sparsity * d)`` weights pruned);
    ``pattern`` "unstructured" or "n:m" (``sparsity`` then ``1 - n/m`` or None). Biases are not
    pruned. ``block_size`` (the column block of the layer-wise OBS methods) and ``seed`` are
    unused: the window is deterministic, in the data's order. ``progress``: unused (one pass).

    Cost: one forward and backward pass over the first ``window`` examples (per-example
    gradients of the target weights); then ``window^2 d`` multiply-adds for the inverse's
    diagonal and ``2 window d`` for the update (one ``F^-1`` product). Memory: ``window * d``
    gradient entries, ``d`` the number of target weights.

    Example:
        >>> import torch
        >>> from curvkit.model import layers
        >>> from curvkit.compress.mfac import mfac_prune
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> masks, infos = mfac_prune(model, layers(model), torch.nn.CrossEntropyLoss(), (x, y), sparsity=0.5,
        ...                           window=32)
        >>> sum(int((~m).sum()) for m in masks.values()), sum(i["total"] for i in infos)   # half of 56 weights
        (28, 56)
    """
    pat = parse_pattern(pattern)
    if pat.structured:
        raise ArgumentError(f"method 'mfac' prunes weights, not whole {pat.kind}s; use pattern='unstructured' or "
                            "'n:m', or method='oba'/'magnitude' for structured pruning")
    if pat.kind == "n:m":
        if sparsity is not None and (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool)
                                     or abs(sparsity - pat.sparsity) > 1e-12):
            raise ArgumentError(f"pattern {pat} fixes the sparsity at {pat.sparsity:g}; got sparsity={sparsity!r} "
                                "(leave it out)")
        sparsity = pat.sparsity
    if (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0):
        raise ArgumentError(f"sparsity must be a number in [0, 1) (the fraction of weights set to zero), got "
                            f"{sparsity!r}")
    if not targets:
        raise ModelError("no layer to prune: params= selects no linear or conv2d layer")
    for layer in targets:
        if layer.kind not in SUPPORTED or not hasattr(layer.module, "weight"):
            raise ModelError(f"method 'mfac' prunes the weights of {' and '.join(SUPPORTED)} layers; {layer.name!r} "
                             f"is a {type(layer.module).__name__} ({layer.kind}); leave it out with params=")
        if layer.tied:
            raise ModelError(f"layer {layer.name!r} shares its weight with another module; leave it out with params=")
    names = [_weight_name(layer) for layer in targets]
    weights = dict(model.named_parameters())
    missing = [n for n in names if n not in weights]
    if missing:
        raise ModelError(f"the targets' weights {missing} are not parameters of the model given")

    probe = mfac(model, loss_fn, data, names, window=window, damping=1.0, block_size=blocks, max_batch=max_batch)
    G = probe.gradients
    if damping == "auto":
        lam = 1e-3 * float((G**2).mean())
        lam = lam if lam > 0 else 1e-8  # all gradients zero: OBS is magnitude pruning
    elif isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0:
        lam = float(damping)
    else:
        raise ArgumentError(f"damping must be 'auto' or a number > 0 added to the Fisher's diagonal, got {damping!r}")
    Finv = MFACOperator(G, damping=lam, window=window, block_size=blocks).inverse()

    w = torch.cat([weights[n].detach().reshape(-1) for n in names]).to(G.dtype)
    diag = Finv.diagonal()
    scores = w**2 / (2 * diag)
    sizes = [weights[n].numel() for n in names]
    if pat.kind == "n:m":
        keep = torch.cat([_nm_mask(layer, s, pat) for layer, s in zip(targets, scores.split(sizes))])
    else:
        k = int(round(sparsity * w.numel()))
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[torch.argsort(scores, stable=True)[:k]] = False
    new = w.clone()
    if update and bool((~keep).any()):
        u = torch.where(keep, torch.zeros_like(w), w / diag)
        new = w - Finv @ u
    new[~keep] = 0
    masks, infos = {}, []
    with torch.no_grad():
        for layer, n, part, kp, sc in zip(targets, names, new.split(sizes), keep.split(sizes), scores.split(sizes)):
            p = weights[n]
            p.copy_(part.view_as(p).to(p.dtype))
            masks[n] = kp.view_as(p).clone()
            kept, total = int(kp.sum()), kp.numel()
            infos.append(dict(name=layer.name, param=n, shape=tuple(p.shape), kept=kept, total=total,
                              sparsity=1 - kept / total, predicted_dloss=float(sc[~kp].sum()), damping=lam,
                              window=probe.count))
    return masks, infos


__all__ = ["mfac_prune", "SUPPORTED"]
