r"""Weight quantizers: the swappable piece that HAWQ's bit allocation, ``BitPlan.apply`` and GPTQ
share.

A quantizer sees a weight as its matrix view ``(out, cols)`` (a conv kernel ``(out,
in*kh*kw)``). ``fit`` chooses the grid from a whole matrix once; ``quantize`` rounds any block of
its columns onto that grid, which is what GPTQ needs (it rounds one column at a time, after
earlier columns' errors have moved the later ones). Any object with ``bits``, ``fit``,
``quantize`` and ``storage_bits`` works where a :class:`UniformQuantizer` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ShapeError

SCALE_BITS = 16  # a scale (and an asymmetric zero point) is stored in half precision


@dataclass(frozen=True)
class QuantGrid:
    """One fitted grid: ``scale`` and ``zero`` of shape ``(out, groups)``, ``group_size`` columns
    per group (``cols`` when not grouped). Values are ``scale * (clamp(round(w / scale) + zero,
    qmin, qmax) - zero)``."""

    scale: Tensor
    zero: Tensor
    group_size: int
    qmin: int
    qmax: int


@runtime_checkable
class Quantizer(Protocol):
    bits: int

    def fit(self, W: Tensor) -> QuantGrid: ...

    def quantize(self, W: Tensor, grid: QuantGrid, start: int = 0) -> Tensor: ...

    def storage_bits(self, shape: tuple[int, int]) -> int: ...


class UniformQuantizer:
    r"""Uniform fake quantization with ``2**bits`` levels, per output channel (a row of the
    matrix view) or per tensor, optionally per group of ``group_size`` columns within a row.

    ``symmetric=True`` (the default) has zero point 0 and the levels
    ``{-2^(b-1), ..., 2^(b-1)-1} * scale``. With ``full_range=True`` (the default, GPTQ's and
    llm-compressor's grid) ``scale = 2 max|w| / (2^b - 1)``: all ``2^b`` levels span
    ``[-max, max]`` and the largest positive weight is clipped by half a step; with
    ``full_range=False``, ``scale = max|w| / (2^(b-1) - 1)`` puts ``max|w|`` on the grid and leaves
    the lowest level unused (a coarser step: on the char-LM GPTQ at 4 bits loses 0.001 nats/char
    more). ``symmetric=False`` maps ``[min, max]`` onto ``{0, ..., 2^b-1}``. A row of zeros gets a
    tiny scale and stays zero.

    Cost: elementwise, one pass over the weight for ``fit`` and one for ``quantize``.

    Example:
        >>> import torch
        >>> from curvkit.compress import UniformQuantizer
        >>> q = UniformQuantizer(4)
        >>> W = torch.tensor([[0.7, -0.1, 0.35]])
        >>> [round(v, 4) for v in q.quantize(W, q.fit(W))[0].tolist()]  # grid step 0.7 / 7.5
        [0.6533, -0.0933, 0.3733]
        >>> q = UniformQuantizer(4, full_range=False)                 # grid step 0.7 / 7
        >>> [round(v, 4) for v in q.quantize(W, q.fit(W))[0].tolist()]
        [0.7, -0.1, 0.4]
    """

    def __init__(self, bits: int, *, symmetric: bool = True, per_channel: bool = True,
                 group_size: int | None = None, full_range: bool = True) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ArgumentError(f"bits must be an integer from 2 to 16, got {bits!r}; one bit has no symmetric "
                                "grid (use bits=2 or more)")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ArgumentError(f"group_size must be a positive integer or None, got {group_size!r}")
        if group_size is not None and not per_channel:
            raise ArgumentError("group_size groups columns within a row: use it with per_channel=True")
        self.bits, self.symmetric, self.per_channel, self.group_size = bits, symmetric, per_channel, group_size
        self.full_range = full_range

    def __repr__(self) -> str:
        return (f"UniformQuantizer({self.bits}, symmetric={self.symmetric}, per_channel={self.per_channel}, "
                f"group_size={self.group_size}, full_range={self.full_range})")

    def _levels(self) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def fit(self, W: Tensor) -> QuantGrid:
        """The grid of the matrix ``W (out, cols)``."""
        if W.dim() != 2:
            raise ShapeError(f"a quantizer fits a matrix (out, cols), got shape {tuple(W.shape)}; pass the weight's "
                             "matrix view, W.reshape(W.shape[0], -1)")
        out, cols = W.shape
        g = self.group_size if self.group_size is not None else cols
        Wf = W.detach().to(torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype)
        if not self.per_channel:
            Wg = Wf.reshape(1, 1, -1)
        else:
            pad = (-cols) % g
            Wg = torch.nn.functional.pad(Wf, (0, pad)) if pad else Wf
            Wg = Wg.reshape(out, -1, g)
            if pad:  # padded zeros must not widen a group's range; use the group's own values
                valid = torch.arange(Wg.shape[1] * g, device=W.device).reshape(-1, g) < cols
                big = torch.finfo(Wg.dtype).max
                lo = torch.where(valid, Wg, torch.full_like(Wg, big)).amin(-1)
                hi = torch.where(valid, Wg, torch.full_like(Wg, -big)).amax(-1)
                return self._grid(lo, hi, g, out)
        return self._grid(Wg.amin(-1), Wg.amax(-1), g, out)

    def _grid(self, lo: Tensor, hi: Tensor, g: int, out: int) -> QuantGrid:
        qmin, qmax = self._levels()
        tiny = torch.finfo(lo.dtype).tiny ** 0.5
        if self.symmetric:
            scale = torch.maximum(hi.abs(), lo.abs()) / (qmax + 0.5 if self.full_range else qmax)
            zero = torch.zeros_like(scale)
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly on the grid (pruned weights stay 0)
            scale = (hi - lo) / (qmax - qmin)
            zero = torch.round(-lo / scale.clamp(min=tiny))
        scale = scale.clamp(min=tiny)
        if not self.per_channel:
            scale, zero = scale.expand(out, 1), zero.expand(out, 1)
        return QuantGrid(scale, zero, g, qmin, qmax)

    def quantize(self, W: Tensor, grid: QuantGrid, start: int = 0) -> Tensor:
        """``W`` rounded onto ``grid``: ``W`` is the whole matrix or the block of its columns that
        begins at column ``start``. Same dtype as ``W``."""
        if W.dim() == 1:
            W = W[:, None]
            return self.quantize(W, grid, start)[:, 0]
        cols = torch.arange(start, start + W.shape[1], device=W.device)
        group = (cols // grid.group_size).clamp(max=grid.scale.shape[1] - 1)
        s, z = grid.scale[:, group].to(W.device), grid.zero[:, group].to(W.device)
        Wf = W.to(s.dtype)
        q = torch.clamp(torch.round(Wf / s) + z, grid.qmin, grid.qmax)
        return (s * (q - z)).to(W.dtype)

    def __call__(self, W: Tensor) -> Tensor:
        """Fit and round in one go (any shape: its matrix view)."""
        M = W.reshape(W.shape[0], -1) if W.dim() != 2 else W
        return self.quantize(M, self.fit(M)).reshape(W.shape)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Bits to store a matrix of ``shape`` quantized: the codes and the grid's scales (and zero
        points) at 16 bits each."""
        out, cols = shape
        groups = math.ceil(cols / self.group_size) if self.group_size else 1
        grids = out * groups if self.per_channel else 1
        return out * cols * self.bits + grids * SCALE_BITS * (1 if self.symmetric else 2)


def stored_bits(model: nn.Module, stored: Mapping[int, float] | None = None) -> float:
    """Bits to store ``model``'s parameters (tied tensors once): a parameter ``p`` with ``id(p)`` in
    ``stored`` at ``stored[id(p)]`` bits (a quantized weight's :meth:`~Quantizer.storage_bits`, a
    sparse one's kept values and mask), every other densely at its dtype. The one size accounting of
    ``quantize``, HAWQ's plans and ``curvkit compress``; bytes are this over 8, never rounded per
    layer. Cost: one pass over the parameters' shapes."""
    stored = stored or {}
    seen = {id(p): p for p in model.parameters()}
    return float(sum(stored[i] if i in stored else p.numel() * p.element_size() * 8 for i, p in seen.items()))


__all__ = ["Quantizer", "QuantGrid", "UniformQuantizer", "SCALE_BITS", "stored_bits"]
