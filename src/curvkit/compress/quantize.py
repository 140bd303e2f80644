"""``compress.quantize``: weight quantization of the linear and conv2d layers, by GPTQ (OBS
rounding with the weight updates, :mod:`.obs`) or round-to-nearest."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArgumentError, DataError, ModelError
from ..model.params import ParamSpec
from .obs import gptq, rtn
from .prune import select_targets
from .quantizers import Quantizer, UniformQuantizer, stored_bits
from .results import save_state_dict

QUANT_METHODS = ("gptq", "rtn")


@dataclass
class QuantizeResult:
    """The outcome of :func:`quantize`. ``model``: the fake-quantized model (weights on the grid,
    stored in the model's dtype; a copy unless ``inplace=True``). ``layers``: per layer ``name``,
    ``shape``, ``damping`` (the fraction of ``mean(diag H)`` added), ``damping_added``,
    ``condition`` (of the damped ``H``), ``error`` (the layer's output error 1/2 tr(dW H dW^T) on the calibration data, computed directly; ``error_damped``: the sweep's sum for the damped H) and
    ``seconds`` (None for RTN). ``size``: bytes of the model's parameters with the quantized
    weights at their storage size (codes and scales), ``original_size`` before."""

    model: nn.Module
    bits: int
    method: str
    layers: list[dict] = field(default_factory=list)
    size: float = 0.0
    original_size: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"bits": self.bits, "method": self.method, "layers": self.layers, "size": self.size,
                "original_size": self.original_size, "seconds": self.seconds}

    def save(self, path: str | Path) -> Path:
        """The quantized model's ``state_dict`` at ``path`` (``.safetensors`` or ``torch.save``);
        it loads into the original architecture."""
        return save_state_dict(self.model.state_dict(), path)


def quantize(model: nn.Module, data: Any = None, bits: int = 4, *, method: str = "gptq", params: ParamSpec = None,
             quantizer: Quantizer | None = None, group_size: int | None = None, damping: Any = "auto",
             block_size: int = 128, sequential: bool = True, act_order: bool = False, max_batch: int | None = None,
             inplace: bool = False, progress: bool | None = None) -> QuantizeResult:
    r"""Quantize the weights of ``model``'s linear and conv2d layers (a copy unless ``inplace``).

    ``method="gptq"``: each layer's columns are rounded one at a time and the error is spread over
    the columns not yet rounded by the OBS update on the layer's input second moment ``H = 2/N
    X^T X`` over ``data`` (input batches, or ``(inputs, targets)`` batches whose targets are
    ignored). ``sequential=True``: layers in forward order, each calibrated on the inputs the
    already-quantized layers produce. ``method="rtn"``: round-to-nearest, no data.

    ``quantizer``: any :class:`~curvkit.compress.quantizers.Quantizer`; by default
    ``UniformQuantizer(bits, group_size=group_size)`` (symmetric, per output channel, groups of
    ``group_size`` columns). With ``quantizer=``, ``bits`` is read from it. ``damping``:
    ``"auto"`` (per layer, the smallest of ``0.01, 0.1, ..., 100`` x ``mean(diag H)`` for which
    the Cholesky factor exists; reported with the condition number) or a fixed float.
    ``act_order``: round columns in decreasing ``diag H``. ``params``: the layers (default all
    linear and conv2d layers; biases are left in full precision).

    Cost (gptq): one forward of the first batch, then one pass over the data per group of
    layers sharing an input (forwards stopped after the group; one pass with
    ``sequential=False``), plus ``O(out cols^2 + cols^3)`` per layer; memory ``cols^2`` per
    layer, plus a copy of the model unless ``inplace``. rtn: elementwise.

    Example:
        >>> import torch
        >>> from curvkit import compress
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> res = compress.quantize(net, torch.randn(128, 16), bits=4)
        >>> [layer["name"] for layer in res.layers], res.size < res.original_size
        (['0', '2'], True)
    """
    t0 = time.perf_counter()
    if method not in QUANT_METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {', '.join(QUANT_METHODS)}")
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if quantizer is None:
        quantizer = UniformQuantizer(bits, group_size=group_size)
    else:
        if group_size is not None:
            raise ArgumentError("group_size= builds the default quantizer; with quantizer= set the groups on it")
        if not isinstance(quantizer, Quantizer):
            raise ArgumentError(f"quantizer must have bits, fit, quantize and storage_bits (a Quantizer), got "
                                f"{type(quantizer).__name__}")
    if method == "gptq" and data is None:
        raise DataError("method='gptq' needs calibration data: pass data= (input batches), or use method='rtn'")
    work = model if inplace else copy.deepcopy(model)
    targets = select_targets(work, params, names_from=None if inplace else model)
    if method == "gptq":
        infos = gptq(work, targets, data, quantizer=quantizer, damping=damping, block_size=block_size,
                     act_order=act_order, sequential=sequential, max_batch=max_batch, progress=progress)
    else:
        infos = rtn(targets, quantizer)
    codes = {id(t.module.weight): quantizer.storage_bits(info["shape"]) for t, info in zip(targets, infos)}
    size, original = stored_bits(work, codes) / 8, stored_bits(work) / 8
    return QuantizeResult(work, int(quantizer.bits), method, infos, size, original, time.perf_counter() - t0)


__all__ = ["quantize", "QuantizeResult", "QUANT_METHODS"]
