r"""Layer-input second moments for layer-wise compression (OBS/SparseGPT pruning, GPTQ).

For a linear layer (GPT-2's ``Conv1D`` included: :attr:`Layer.transposed`) or a ``Conv2d``
(``groups=1``) with matrix view ``W (out, cols)``, the reconstruction loss of a changed weight
``W'`` over the calibration data is

    E(W') = 1/N ||(W - W') X^T||_F^2 = 1/2 sum_rows (w - w') H (w - w')^T,   H = 2/N X^T X,

with ``X (N, cols)`` the layer's input rows (a conv: one unfolded patch per output position, the
rows of :func:`curvkit.approx.kronecker.input_rows`; ``N`` counts rows, not examples). ``H`` is
K-FAC's activation factor ``A`` without the bias column, times ``2 T`` (``T`` rows per example).

**Sequential mode** (GPTQ's default): :func:`calibrate` yields the layers in forward order, and
each one's ``H`` is measured on the inputs the model produces *after* the caller compressed the
layers yielded before it. Layers fed by the same input tensor (q, k and v projections) share one
pass. Each pass stops the forward as soon as its layers have run.

:func:`damped_cholesky` is the adaptive damping every peer's users ask for: it tries the
Cholesky factor of ``H + lambda mean(diag H) I`` from ``lambda = 0.01`` up, x10 at a time, and
reports the damping it needed and the condition number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..approx.kronecker import input_rows
from ..errors import ArgumentError, CurvkitError, DataError, ModelError, NonFiniteError
from ..model.data import Batches, is_batch, map_tensors, split_batch, tensors_of
from ..model.hooks import LayerHooks
from ..model.layers import Layer, conv_reason
from ..model.risk import model_mode

SUPPORTED = "linear layers (nn.Linear, GPT-2's Conv1D, any module computing x W^T + b) and nn.Conv2d with groups=1"
DAMPING_START, DAMPING_CAP = 0.01, 100.0


class _Stop(Exception):
    """Raised by a hook once the layers of a pass have run: the rest of the forward is not needed."""


def unsupported(layer: Layer) -> str | None:
    """None if layer-wise compression handles ``layer``; otherwise what it is."""
    if layer.tied:
        return f"module {layer.name!r} shares its weight with another module (tied weights)"
    if layer.kind not in ("linear", "conv2d"):
        return f"module {layer.name!r} is a {type(layer.module).__name__} ({layer.kind})"
    if layer.kind == "conv2d" and conv_reason(layer.module) is not None:
        return f"module {layer.name!r} is {conv_reason(layer.module)}"
    return None


def matrix_view(module: nn.Module, transposed: bool = False) -> Tensor:
    """A layer module's weight as its matrix ``(out, cols)``: rows are output channels (a conv
    kernel ``(out, C*kh*kw)``; GPT-2's ``Conv1D`` transposed; an embedding's rows its tokens'
    vectors). A view where possible, not a copy."""
    w = module.weight
    return w.T if transposed else w.reshape(w.shape[0], -1)


def write_matrix(module: nn.Module, transposed: bool, M: Tensor) -> None:
    """Write the matrix view ``M (out, cols)`` back into the module's weight, in place (its dtype)."""
    w = module.weight
    with torch.no_grad():
        w.copy_((M.T if transposed else M.reshape(w.shape)).to(w.dtype))


def fake_quantize(module: nn.Module, transposed: bool, quantizer: Any) -> None:
    """Round the module's weight onto ``quantizer``'s grid, fitted on the whole matrix, in place
    (round-to-nearest; a low-precision weight is rounded in float32)."""
    W = matrix_view(module, transposed).detach()
    Wf = W.to(torch.promote_types(W.dtype, torch.float32))
    write_matrix(module, transposed, quantizer.quantize(Wf, quantizer.fit(Wf)))


def weight_matrix(layer: Layer) -> Tensor:
    """The layer's weight as its matrix view ``(out, cols)`` (see :func:`matrix_view`)."""
    return matrix_view(layer.module, layer.transposed)


def set_weight_matrix(layer: Layer, M: Tensor) -> None:
    """Write the matrix view ``M (out, cols)`` back into the layer's weight, in place."""
    write_matrix(layer.module, layer.transposed, M)


def matrix_to_weight(layer: Layer, M: Tensor) -> Tensor:
    """A matrix-view tensor (e.g. a mask) in the shape of the layer's weight."""
    w = layer.module.weight
    return M.T.contiguous() if layer.transposed else M.reshape(w.shape)


class Calibration:
    """Calibration data for layer-wise compression: ``(inputs, targets)`` batches (targets are not
    used) or inputs alone: a tensor, a dict of tensors, or a *list* of them (a tuple of two
    tensors is one ``(inputs, targets)`` batch, as everywhere in curvkit). Dict inputs are
    passed as keyword arguments (``model(**inputs)``). Inputs are moved to ``device``."""

    def __init__(self, data: Any, device: torch.device, max_batch: int | None = None):
        if data is None:
            raise DataError("this method needs calibration data: pass data= (a list of input batches, or of "
                            "(inputs, targets) batches)")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ArgumentError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        inputs_only = isinstance(data, list) or (isinstance(data, tuple) and not is_batch(data))
        if isinstance(data, (Tensor, Mapping)):
            data = [_pair(data)]
        elif inputs_only and data and all(isinstance(b, (Tensor, Mapping)) for b in data):
            data = [_pair(b) for b in data]
        self.batches = data if isinstance(data, Batches) else Batches(data)
        self.device, self.max_batch = device, max_batch

    def __iter__(self) -> Iterator[Any]:
        for _, x, y in self.batches:
            x = map_tensors(lambda t: t.to(self.device), x)
            if self.max_batch is not None and y.shape[0] > self.max_batch:
                for xs, _ in split_batch(x, y, self.max_batch):
                    yield xs
            else:
                yield x


def _pair(x: Any) -> tuple[Any, Tensor]:
    ts = tensors_of(x)
    if not ts or ts[0].dim() == 0:
        raise DataError("a calibration batch of inputs must hold tensors with a batch dimension first")
    return x, torch.zeros(ts[0].shape[0], device=ts[0].device)


def _call(model: nn.Module, x: Any, i: int, first: Layer | None) -> None:
    try:
        model(**x) if isinstance(x, Mapping) else model(x)
    except _Stop:
        pass
    except CurvkitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = [tuple(t.shape) for t in tensors_of(x)]
        expect = ""
        if first is not None:
            m = first.module
            if isinstance(m, nn.Conv2d):
                expect = f" (its first layer {first.name!r} takes {m.in_channels} input channels: (batch, {m.in_channels}, H, W))"
            elif isinstance(m, nn.Linear):
                expect = f" (its first layer {first.name!r} takes {m.in_features} features in the last dimension)"
        raise DataError(f"the model refused calibration batch {i} (inputs of shape {', '.join(map(str, shapes))}): "
                        f"{type(e).__name__}: {e}. Pass batches of the inputs the model takes{expect}") from e


def forward_order(model: nn.Module, targets: list[Layer], calib: Calibration) -> list[list[Layer]]:
    """``targets`` in the order they run, grouped: consecutive layers fed by the same input tensor
    form one group. Cost: one forward of the first calibration batch."""
    order: list[tuple[Layer, Tensor]] = []

    def rec(layer: Layer):
        def hook(module: nn.Module, inputs: tuple, out: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                order.append((layer, inputs[0]))
        return hook

    handles = [t.module.register_forward_hook(rec(t)) for t in targets]
    first = next(iter(calib))
    try:
        with torch.no_grad(), model_mode(model), LayerHooks(targets, root=model, no_grad=True, hint=_SHARED_HINT):
            _call(model, first, 0, targets[0] if targets else None)
    finally:
        for h in handles:
            h.remove()
    ran = {id(lay) for lay, _ in order}
    missing = [t.name for t in targets if id(t) not in ran]
    if missing:
        raise ModelError(f"layer(s) {', '.join(map(repr, missing))} did not run in the model's forward on the "
                         "calibration data; leave them out with params=")
    groups: list[list[Layer]] = []
    last: Tensor | None = None
    for layer, x in order:
        if groups and x is last:
            groups[-1].append(layer)
        else:
            groups.append([layer])
        last = x
    return groups


def second_moments(model: nn.Module, group: list[Layer], calib: Calibration) -> dict[str, Tensor]:
    """``H = 2/N X^T X`` of every layer of ``group`` over the calibration data (float32 or
    better), the forward stopped once they have run. Cost: one (partial) forward per calibration
    batch; memory ``cols^2`` per layer. Raises NonFiniteError naming a layer whose ``H`` is not
    finite."""
    acc: dict[str, Tensor] = {}
    rows: dict[str, int] = {layer.name: 0 for layer in group}
    names = {layer.name for layer in group}
    hooks = LayerHooks(group, root=model, no_grad=True, hint=_SHARED_HINT)

    def stop(module: nn.Module, inputs: tuple, out: Any) -> None:
        if names <= set(hooks.inputs):
            raise _Stop

    with torch.no_grad(), model_mode(model), hooks:
        handles = [layer.module.register_forward_hook(stop) for layer in group]
        try:
            for i, x in enumerate(calib):
                hooks.clear()
                _call(model, x, i, None)
                for layer in group:
                    if layer.name not in hooks.inputs:
                        raise ModelError(f"layer {layer.name!r} did not run on calibration batch {i}; leave it "
                                         "out with params=")
                    r, _ = input_rows(layer.module, hooks.inputs[layer.name])
                    if layer.has_bias:
                        r = r[:, :-1]
                    r = r.to(torch.promote_types(r.dtype, torch.float32))
                    acc[layer.name] = r.T @ r if layer.name not in acc else acc[layer.name].addmm_(r.T, r)
                    rows[layer.name] += r.shape[0]
                hooks.clear()
        finally:
            for h in handles:
                h.remove()
    out = {}
    for layer in group:
        H = acc[layer.name] * (2.0 / rows[layer.name])
        if not bool(torch.isfinite(H).all()):
            raise NonFiniteError(f"the input second moment of layer {layer.name!r} is not finite: the inputs that "
                                 "reach it hold NaN/inf (check the calibration data and the earlier layers' weights)")
        out[layer.name] = H
    return out


def calibrate(model: nn.Module, targets: list[Layer], data: Any, *, sequential: bool = True,
              max_batch: int | None = None) -> Iterator[tuple[Layer, Tensor]]:
    """Yield ``(layer, H)`` for every target in forward order (``H = 2/N X^T X``).

    ``sequential=True``: each ``H`` is measured when its layer is reached, on the inputs of the
    model as the caller has changed it so far (compress the layer before asking for the next).
    ``sequential=False``: every ``H`` from one pass over the data with the original model.

    Cost: one forward of the first batch to learn the order, then one pass over the data per
    group of layers sharing an input (sequential, each forward stopped after the group) or one
    pass in all; memory ``cols^2`` floats per layer held at once.
    """
    for t in targets:
        why = unsupported(t)
        if why is not None:
            raise ModelError(f"layer-wise compression does not support {why}; it supports {SUPPORTED}. Leave it "
                             "out with params=")
    device = next(iter(targets)).module.weight.device
    calib = Calibration(data, device, max_batch)
    groups = forward_order(model, targets, calib)
    if sequential:
        for group in groups:
            Hs = second_moments(model, group, calib)
            for layer in group:
                yield layer, Hs.pop(layer.name)
    else:
        every = [layer for g in groups for layer in g]
        Hs = second_moments(model, every, calib)
        for layer in every:
            yield layer, Hs.pop(layer.name)


@dataclass
class Damped:
    """The factor :func:`damped_cholesky` found: ``Uinv`` the upper Cholesky factor of
    ``(H + damping mean(diag H) I)^{-1}`` (the form OBS/GPTQ sweep over), the relative
    ``damping`` used, the absolute value added, the 2-norm condition number of the damped ``H``,
    and ``dead`` (inputs that are always 0: their weights are set to 0, as GPTQ does)."""

    Uinv: Tensor
    damping: float
    added: float
    condition: float
    dead: Tensor


def damped_cholesky(H: Tensor, damping: Any = "auto", name: str = "layer") -> Damped:
    """The damped inverse Cholesky factor of a layer's ``H`` (a copy; ``H`` is not changed).

    ``damping="auto"``: ``lambda = 0.01, 0.1, ...`` (times ``mean(diag H)``) until both Cholesky
    factorizations succeed, up to 100; a float fixes ``lambda`` (0 allowed when ``H`` is positive
    definite). Dead inputs (``diag H = 0``) get a unit diagonal. Cost: a few ``cols^3`` Cholesky
    factorizations and one ``eigvalsh`` for the condition number; memory a few ``cols^2``.
    """
    auto = isinstance(damping, str) and damping == "auto"
    if not auto and (isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0
                     or not math.isfinite(damping)):
        raise ArgumentError(f"damping must be 'auto' or a finite number >= 0 (a fraction of mean(diag H)), got "
                            f"{damping!r}")
    if not bool(torch.isfinite(H).all()):
        raise NonFiniteError(f"the input second moment of layer {name!r} is not finite; check the calibration data")
    H = H.clone()
    diag = H.diagonal()
    dead = diag == 0
    # the scale of the damping: the live inputs' mean (dead ones, set to 1 below, would swamp
    # inputs of small scale, e.g. ~1e-3, with a damping far larger than their own curvature)
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    H[dead, dead] = 1.0
    if mean <= 0:
        mean = 1.0
    lam = DAMPING_START if auto else float(damping)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    while True:
        Hd = H + (lam * mean) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                break
        if not auto:
            raise ModelError(f"layer {name!r}: H + {lam:g} mean(diag H) I is not positive definite (its Cholesky "
                             "factor does not exist); pass damping='auto' (or a larger damping)")
        if lam >= DAMPING_CAP:
            raise ModelError(f"layer {name!r}: the input second moment is not positive definite even with damping "
                             f"{lam:g} x mean(diag H); its inputs are badly scaled or degenerate. Run in float64 "
                             "(model.double()) or leave the layer out with params=")
        lam *= 10
    ev = torch.linalg.eigvalsh(Hd.to(torch.float64))
    cond = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else math.inf
    return Damped(U, lam, lam * mean, cond, dead)


_SHARED_HINT = ("Layer-wise compression calibrates each layer on the inputs of its one call; leave such a layer "
                "out with params=")

__all__ = ["Calibration", "calibrate", "second_moments", "forward_order", "damped_cholesky", "Damped",
           "unsupported", "weight_matrix", "set_weight_matrix", "matrix_to_weight", "SUPPORTED"]
