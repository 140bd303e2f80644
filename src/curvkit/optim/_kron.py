"""Kronecker-factored gradient statistics shared by Shampoo and SOAP.

- **Matrix view.** A parameter with ``dim >= 2`` is seen as the matrix ``(shape[0], rest)``
  (:func:`curvkit.model.layers.matrix_shape`): a linear weight as is, a conv kernel
  ``(out, in, kh, kw)`` as ``(out, in*kh*kw)`` (the K-FAC convention, two factors rather than
  one per tensor dimension). 1-D and 0-d parameters (biases,
  norm scales) get no factors: both optimizers treat them with Adam's diagonal.
- **Blocking.** A matrix dimension longer than ``block_size`` is cut into chunks of
  ``block_size`` (the last one shorter); every block ``G[rows, cols]`` has its own factors
  ``L`` (rows x rows) and ``R`` (cols x cols), so no factor is larger than ``block_size``.
- **Statistics.** ``L <- beta L + (1 - beta) G G^T``, ``R <- beta R + (1 - beta) G^T G``: the
  exponential moving average of Distributed Shampoo and SOAP (the original Shampoo sums;
  an EMA forgets old curvature and, bias-corrected by ``1 - beta^t``, has the sums' scale
  divided by ``t``, which the inverse root's homogeneity turns into a scalar factor).
  Kept in float32 for bf16/fp16 parameters (float64 stays float64).
- **Batching.** Blocks of the same shape (across all parameters of a group) are stacked and
  processed by batched products (``baddbmm``/``bmm``) and one batched ``eigh``/root, so the
  number of kernel launches per step does not grow with the number of parameters of one shape.

Nothing here changes state in place: the optimizers stage the new state
(:class:`curvkit.optim._base.Staged`) and the step protocol checks it once for finiteness (one
host sync per step) before copying it in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..model.layers import matrix_shape
from ._base import CurvkitOptimizer, Staged, state_dtype


def block_slices(m: int, n: int, block_size: int) -> list[tuple[slice, slice]]:
    """The blocks ``(rows, cols)`` of an ``m x n`` matrix with no side longer than ``block_size``,
    row-major. ``m, n <= block_size`` gives the one block of the whole matrix."""
    rows = [slice(i, min(i + block_size, m)) for i in range(0, m, block_size)]
    cols = [slice(j, min(j + block_size, n)) for j in range(0, n, block_size)]
    return [(r, c) for r in rows for c in cols]


def block_shape(blk: tuple[slice, slice]) -> tuple[int, int]:
    return blk[0].stop - blk[0].start, blk[1].stop - blk[1].start


def stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` without the copy when there is one tensor (then a view)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def factor_ema(L: Tensor, R: Tensor, G: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """New ``(beta L + (1-beta) G G^T, beta R + (1-beta) G^T G)`` for stacked blocks
    ``G: (k, m, n)``, ``L: (k, m, m)``, ``R: (k, n, n)``, out of place. Cost: two batched
    products, ``2 k m n (m + n)`` flops."""
    Gt = G.transpose(-1, -2)
    return (torch.baddbmm(L, G, Gt, beta=beta, alpha=1 - beta),
            torch.baddbmm(R, Gt, G, beta=beta, alpha=1 - beta))


def group_by(items: Iterable[Any], key: Callable[[Any], Hashable]) -> dict:
    """Items grouped by ``key``, groups and items in first-seen order."""
    out: dict = defaultdict(list)
    for it in items:
        out[key(it)].append(it)
    return out


# --- one group's step: matrix blocks bucketed for batched calls, new state staged ----------
# A bucket is a list of ``(i, j, blk)``: block ``j`` (slices ``blk`` of the matrix view) of
# parameter ``i``; all blocks of a bucket share shape, phase, dtype and device.

def matrix_blocks(params: list[Tensor], grads: list[Tensor], block_size: int,
                  phase: Callable[[int], Hashable]) -> tuple[dict, dict]:
    """``(bufs, buckets)``: ``bufs[i]``, for each matrix parameter, a buffer that gathers its
    blocks' directions when it has several blocks (``None`` with one); ``buckets``, the blocks
    grouped by ``(block shape, phase(i), dtype, device)``, in first-seen order."""
    entries, bufs = [], {}
    for i, p in enumerate(params):
        if (mn := matrix_shape(p.shape)) is not None:
            blocks = block_slices(*mn, block_size)
            entries += [(i, j, blk) for j, blk in enumerate(blocks)]
            bufs[i] = torch.empty(mn, dtype=grads[i].dtype, device=grads[i].device) if len(blocks) > 1 else None
    key = lambda e: (block_shape(e[2]), phase(e[0]), grads[e[0]].dtype, grads[e[0]].device)  # noqa: E731
    return bufs, group_by(entries, key)


def block_views(xs: list[Tensor], bucket: list) -> list[Tensor]:
    """The bucket's blocks of ``xs[i]`` seen as matrices: views when ``xs[i]`` is contiguous, as
    state always is (``load_state_dict`` makes it so), so a copy into one writes ``xs[i]``."""
    return [xs[i].reshape(matrix_shape(xs[i].shape))[blk] for i, _, blk in bucket]


def state_blocks(states: list[dict], bucket: list, name: str) -> list[Tensor]:
    """The per-block state entries ``name{j}`` of the bucket's blocks."""
    return [states[i][f"{name}{j}"] for i, j, _ in bucket]


def scatter(D: Tensor, bucket: list, params: list[Tensor], bufs: dict, dirs: dict) -> None:
    """``dirs[i]`` = parameter ``i``'s direction from the stacked block directions ``D``: a view
    of ``D`` for a one-block parameter, else its buffer with this bucket's blocks copied in."""
    for k, (i, _, blk) in enumerate(bucket):
        if bufs[i] is None:
            dirs[i] = D[k].view(params[i].shape)
        else:
            bufs[i][blk].copy_(D[k])
            dirs[i] = bufs[i].view(params[i].shape)


def put_blocks(new: Staged, states: list[dict], bucket: list, name: str, X: Tensor) -> None:
    """State entries ``name{j}`` of the bucket's blocks get ``X[k]`` (made if missing), copied out
    of the stack; the stack is checked once."""
    for k, (i, j, _) in enumerate(bucket):
        new.store(states[i], f"{name}{j}", X[k])
    new.check.append(X)


def ema_factors(new: Staged, states: list[dict], bucket: list, G: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """New factors ``L``, ``R`` of the bucket's blocks (:func:`factor_ema` of the stacked gradient
    blocks ``G``), staged into their state entries and returned stacked."""
    Ls, Rs = state_blocks(states, bucket, "L"), state_blocks(states, bucket, "R")
    L, R = factor_ema(stack(Ls), stack(Rs), G, beta)
    new.replace(Ls + Rs, [*L.unbind(0), *R.unbind(0)])
    return L, R


class KronOptimizer(CurvkitOptimizer):
    """What Shampoo and SOAP share: the state of a matrix parameter's blocks, and a step that
    stages every group's new state (``_prepare(group, staged)``) for the step protocol. A NaN/inf
    gradient, factor, root or eigenbasis raises ``NonFiniteError`` with parameters and state
    untouched."""

    _what = "a Kronecker factor or update"
    _renamed = {"update_each": "every"}

    def _prepare(self, group: dict, new: Staged) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`CurvkitOptimizer.load_state_dict`; the moments are made contiguous (as
        ``_init_state`` makes them), since SOAP writes them through views of their matrix blocks.
        Other entries keep their layout, which bit-exact resumption needs."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st and not st[k].is_contiguous():
                    st[k] = st[k].contiguous()

    def _init_state(self, params: list[Tensor], block_size: int, new: Staged) -> list[dict]:
        """The parameters' state dicts. On first sight of a parameter a fresh one, entered into
        ``self.state`` only by the commit: Adam's two moments, and zero factors ``L{j}``/``R{j}``
        for every block ``j`` of its matrix view (state in ``state_dtype``). Refuses sparse
        gradients."""
        states = []
        for p in params:
            if p.grad.is_sparse:
                raise ArgumentError(f"{type(self).__name__} does not support sparse gradients")
            st = self._staged_state(p, new)
            if not st:  # zeros in place of the moments and factors: the first step's EMA starts from them
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                if (mn := matrix_shape(p.shape)) is not None:
                    for j, blk in enumerate(block_slices(*mn, block_size)):
                        m, n = block_shape(blk)
                        st[f"L{j}"] = p.new_zeros((m, m), dtype=state_dtype(p))
                        st[f"R{j}"] = p.new_zeros((n, n), dtype=state_dtype(p))
            states.append(st)
        return states

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update from ``p.grad``; ``closure`` (optional) re-evaluates the model, calls
        ``backward`` and returns the loss, as in torch."""
        return self._step_groups(closure)
