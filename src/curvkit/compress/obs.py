r"""Layer-wise Optimal Brain Surgeon: SparseGPT/OBC pruning and GPTQ quantization.

Both minimise a layer's reconstruction loss ``E(W') = 1/2 sum_rows (w - w') H (w - w')^T`` with
``H = 2/N X^T X`` (:mod:`.calibration`), one column at a time, from the upper Cholesky factor
``U`` of ``H^{-1}`` (``H^{-1} = U^T U``). Column ``j`` is pruned or rounded to ``q``, and the
columns after it absorb the error by the OBS update restricted to them:

    delta w_{j:} = -(w_j - q_j) / U_jj * U_{j, j:},     delta E = (w_j - q_j)^2 / (2 U_jj^2).

For the first column this is exactly OBS (``U_{0,:} = H^{-1}_{0,:} / sqrt(H^{-1}_{00})``:
``delta w = -w_q H^{-1} e_q / [H^{-1}]_qq``, ``delta E = w_q^2 / (2 [H^{-1}]_qq)``), and for a later
column it is OBS with the earlier columns held fixed. Columns are swept in blocks of
``block_size`` (the updates of later blocks batched into one matrix product), rows all at once.

Pruning picks, per block, the weights of least ``w^2 / U_jj^2`` (unstructured: the block's share
of the layer's sparsity; n:m: the ``m - n`` least of every ``m`` consecutive inputs of a row).
GPTQ rounds with the shared quantizer (:class:`~curvkit.compress.quantizers.UniformQuantizer`):
its grid is fitted once per layer, or per group on the weights as updated when the sweep
reaches the group; ``act_order`` sweeps the columns in decreasing ``diag H`` (then the group
grids are fitted up front, in the original column order).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..model.layers import Layer
from ..progress import progress as progress_bar
from .calibration import (calibrate, damped_cholesky, fake_quantize, matrix_to_weight, set_weight_matrix,
                          weight_matrix)
from .quantizers import Quantizer
from .results import Pattern


def _work(W: Tensor) -> Tensor:
    return W.detach().to(torch.promote_types(W.dtype, torch.float32), copy=True).contiguous()


def _block(block_size: int, pattern: Pattern | None = None) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ArgumentError(f"block_size must be a positive integer (columns per block), got {block_size!r}")
    if pattern is not None and pattern.kind == "n:m" and block_size % pattern.m:
        block_size = max(pattern.m, block_size - block_size % pattern.m)  # groups never straddle blocks
    return block_size


def obs_prune_matrix(W: Tensor, H: Tensor, *, sparsity: float, pattern: Pattern, damping: Any = "auto",
                     block_size: int = 128, name: str = "layer") -> tuple[Tensor, Tensor, dict]:
    """SparseGPT on one matrix ``W (out, cols)`` with input second moment ``H (cols, cols)``.

    Returns the pruned and updated weights (float32 or better), the keep mask and the figures
    ``damping``, ``damping_added``, ``condition``, ``error`` (see :func:`reconstruction_error`)
    and ``error_damped`` (the sweep's own sum, for the damped ``H``: larger when damping is).
    Cost: ``O(out cols^2 + cols^3)``; memory a few ``cols^2`` and ``out x block_size``.
    """
    W = _work(W)
    W0 = W.clone()
    rows, cols = W.shape
    bs = _block(block_size, pattern)
    d = damped_cholesky(H.to(W.dtype), damping, name)
    W[:, d.dead] = 0
    U = d.Uinv
    keep = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=W.dtype, device=W.device)
    nm = pattern.kind == "n:m"
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        u = U1.diagonal()
        k1 = torch.ones(W1.shape, dtype=torch.bool, device=W.device)
        if not nm:  # this block's share of the layer's pruned count, rounded cumulatively: exact in total
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            if k > 0:
                score = (W1 ** 2 / u[None, :] ** 2).reshape(-1)
                k1.view(-1)[torch.topk(score, k, largest=False).indices] = False
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                score = W1[:, i:i + pattern.m] ** 2 / u[None, i:i + pattern.m] ** 2
                drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
                k1[:, i:i + pattern.m].scatter_(1, drop, False)
            w = W1[:, i]
            q = torch.where(k1[:, i], w, torch.zeros_like(w))
            err = (w - q) / u[i]
            loss += err ** 2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = k1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    W[~keep] = 0
    return W, keep, {"damping": d.damping, "damping_added": d.added, "condition": d.condition,
                     "error": reconstruction_error(W - W0, H), "error_damped": float(loss.sum())}


def reconstruction_error(D: Tensor, H: Tensor) -> float:
    """``1/2 tr(D H D^T)`` for the weight change ``D`` and the undamped ``H = 2/N X^T X``: the
    mean over the calibration rows of ``||D x||^2``, the layer's output error, computed directly
    rather than from the sweep (which sums it for the damped ``H``). Cost: one ``out x cols x
    cols`` product."""
    H = H.to(D.dtype)
    return float(0.5 * ((D @ H) * D).sum())


def gptq_matrix(W: Tensor, H: Tensor, quantizer: Quantizer, *, damping: Any = "auto", block_size: int = 128,
                act_order: bool = False, name: str = "layer") -> tuple[Tensor, dict]:
    """GPTQ on one matrix ``W (out, cols)``: the quantized, error-compensated weights (float32
    or better) and the figures ``damping``, ``damping_added``, ``condition``, ``error`` (see
    :func:`reconstruction_error`) and ``error_damped`` (the sweep's sum, for the damped ``H``).
    Cost: ``O(out cols^2 + cols^3)``; memory a few ``cols^2``."""
    W = _work(W)
    W0 = W.clone()
    rows, cols = W.shape
    bs = _block(block_size)
    H = H0 = H.to(W.dtype)
    dead = H.diagonal() == 0
    W[:, dead] = 0
    group = getattr(quantizer, "group_size", None)
    lazy = bool(group) and group < cols and not act_order
    grid = None if lazy else quantizer.fit(W)
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    d = damped_cholesky(H, damping, name)
    U = d.Uinv
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, dtype=W.dtype, device=W.device)
    g0 = 0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        u = U1.diagonal()
        for i in range(i2 - i1):
            j = i1 + i
            if lazy and j % group == 0:  # this group's grid, from the weights as updated so far
                part = W1[:, i:i + group]
                more = min(group - part.shape[1], cols - i2)
                if more > 0:  # the group runs past this block: its columns with this block's updates so far
                    part = torch.cat([part, W[:, i2:i2 + more] - E1[:, :i] @ U[i1:i1 + i, i2:i2 + more]], 1)
                grid, g0 = quantizer.fit(part), j
            w = W1[:, i]
            start = (j - g0) if lazy else (int(perm[j]) if perm is not None else j)
            q = quantizer.quantize(w[:, None], grid, start=start)[:, 0]
            err = (w - q) / u[i]
            loss += err ** 2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q[:, j] = q
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, {"damping": d.damping, "damping_added": d.added, "condition": d.condition,
               "error": reconstruction_error(Q - W0, H0),
               "error_damped": float(loss.sum())}


def check_pattern(targets: list[Layer], pattern: Pattern) -> None:
    """n:m needs a layer width that is a multiple of m (ArgumentError naming the layer)."""
    if pattern.kind != "n:m":
        return
    for t in targets:
        cols = weight_matrix(t).shape[1]
        if cols % pattern.m:
            raise ArgumentError(f"pattern {pattern} groups every {pattern.m} consecutive inputs of a row, but layer "
                                f"{t.name!r} has {cols} inputs per row (not a multiple of {pattern.m}); leave it out "
                                "with params= or use pattern='unstructured'")


def weight_name(layer: Layer) -> str:
    return layer.param_names[layer.attrs.index("weight")]


def _sweep(model: nn.Module, targets: list[Layer], data: Any, step, *, sequential: bool, max_batch: int | None,
           progress: bool | None, desc: str) -> list[dict]:
    bar = progress_bar(total=len(targets), desc=desc, enabled=progress)
    infos: dict[str, dict] = {}
    try:
        for layer, H in calibrate(model, targets, data, sequential=sequential, max_batch=max_batch):
            t0 = time.perf_counter()
            info = step(layer, H)
            info["seconds"] = time.perf_counter() - t0
            infos[layer.name] = info
            bar.update(1)
    finally:
        bar.close()
    return [infos[t.name] for t in targets]


def obs_prune(model: nn.Module, targets: list[Layer], loss_fn: Any, data: Any, *, sparsity: float,
              pattern: Pattern, damping: Any = "auto", block_size: int = 128, seed: Any = 0,
              progress: bool | None = None, max_batch: int | None = None,
              sequential: bool = True) -> tuple[dict[str, Tensor], list[dict]]:
    """SparseGPT pruning of every target layer, in place (``model`` is the caller's copy): each
    layer loses ``sparsity`` of its weights (or follows the n:m pattern) and its kept weights get
    the OBS update. ``loss_fn`` and ``seed`` are not used (the method is deterministic and needs
    only the inputs). Returns the keep masks by weight name and per-layer figures (``damping``,
    ``condition``, ``error``: the layer's output error on the calibration data, ``error_damped``).

    Cost: one forward of the first batch, then one pass over the calibration data per group of
    layers sharing an input (each forward stopped after that group; ``sequential=False``: one
    pass), plus ``O(out cols^2 + cols^3)`` per layer; memory ``cols^2`` per layer.
    """
    check_pattern(targets, pattern)
    masks: dict[str, Tensor] = {}

    def step(layer: Layer, H: Tensor) -> dict:
        W = weight_matrix(layer)
        Wp, keep, info = obs_prune_matrix(W, H, sparsity=sparsity, pattern=pattern, damping=damping,
                                          block_size=block_size, name=layer.name)
        set_weight_matrix(layer, Wp)
        masks[weight_name(layer)] = matrix_to_weight(layer, keep)
        kept = int(keep.sum())
        return {"name": layer.name, "shape": tuple(W.shape), "kept": kept, "total": keep.numel(),
                "sparsity": 1 - kept / keep.numel(), **info}

    infos = _sweep(model, targets, data, step, sequential=sequential, max_batch=max_batch, progress=progress,
                   desc="OBS pruning")
    return masks, infos


def gptq(model: nn.Module, targets: list[Layer], data: Any, *, quantizer: Quantizer, damping: Any = "auto",
         block_size: int = 128, act_order: bool = False, sequential: bool = True, max_batch: int | None = None,
         progress: bool | None = None) -> list[dict]:
    """GPTQ of every target layer, in place: per-layer figures (``name``, ``shape``, ``damping``,
    ``condition``, ``error``). Cost as :func:`obs_prune`."""

    def step(layer: Layer, H: Tensor) -> dict:
        W = weight_matrix(layer)
        Q, info = gptq_matrix(W, H, quantizer, damping=damping, block_size=block_size, act_order=act_order,
                              name=layer.name)
        set_weight_matrix(layer, Q)
        return {"name": layer.name, "shape": tuple(W.shape), **info}

    return _sweep(model, targets, data, step, sequential=sequential, max_batch=max_batch, progress=progress,
                  desc="GPTQ")


def rtn(targets: list[Layer], quantizer: Quantizer) -> list[dict]:
    """Round-to-nearest: every target's weight rounded by ``quantizer`` alone, in place."""
    infos = []
    for layer in targets:
        W = weight_matrix(layer)
        fake_quantize(layer.module, layer.transposed, quantizer)
        infos.append({"name": layer.name, "shape": tuple(W.shape), "damping": None, "condition": None,
                      "error": None, "seconds": 0.0})
    return infos


__all__ = ["obs_prune", "obs_prune_matrix", "gptq", "gptq_matrix", "rtn", "check_pattern", "weight_name"]
