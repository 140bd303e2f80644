"""The one hook manager: each layer's input and the gradient of the loss at its output.

Two ways to reach the output gradients, both correct when an in-place op follows the layer
(``nn.ReLU(inplace=True)``, as in torchvision's ResNets), which overwrites the layer's output
tensor and rewrites its autograd history:

- ``grad_targets=True`` (curvkit's own passes, e.g. K-FAC's factors from ``m`` batched columns):
  the hook adds a zero to the output and keeps that zero (an expanded 0-d tensor, no memory) as
  the target of ``torch.autograd.grad``. Nothing downstream can modify it in place, so its
  gradient is the gradient at the layer's output.
- ``on_grad=fn`` (during the user's own ``loss.backward()``, e.g. the K-FAC optimizer): a tensor
  hook on the output calls ``fn(layer, input, grad)``. torch gives a hook registered before an
  in-place op the gradient of the value before it.

A layer called more than once in one forward (weight sharing) raises :class:`ModelError`:
its statistics would mix calls. A forward pre-hook on ``root`` (the whole model) starts a new
forward for that count.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LossError, ModelError
from .layers import Layer

GradFn = Callable[[Layer, Tensor, Tensor], None]


def weight_shared_error(name: str, hint: str) -> ModelError:
    return ModelError(
        f"layer {name!r} is called more than once in one forward pass (weight sharing); its Kronecker "
        f"factors assume one call per forward and would be wrong. {hint}"
    )


class LayerHooks:
    """Forward hooks on ``layers``; a context manager, or :meth:`attach` / :meth:`remove`.

    ``inputs[name]``: the layer's (detached) input of the last forward; ``targets[name]``: with
    ``grad_targets``, the tensor whose gradient is the one at the layer's output. ``enabled``:
    a callable checked on every forward (record nothing when it returns False). ``no_grad``:
    record the inputs of forwards without autograd too (calibration passes under
    ``torch.no_grad()``; by default only forwards that build a graph are recorded). The hooks hold
    only a weak reference to this object, so a forgotten manager is collected with its owner.
    """

    def __init__(self, layers: list[Layer], *, root: nn.Module | None = None, grad_targets: bool = False,
                 on_grad: GradFn | None = None, enabled: Callable[[], bool] | None = None, hint: str = "",
                 no_grad: bool = False):
        self.layers, self.root, self.grad_targets, self.on_grad = layers, root, grad_targets, on_grad
        self.enabled, self.hint, self.no_grad = enabled, hint, no_grad
        self.inputs: dict[str, Tensor] = {}
        self.targets: dict[str, Tensor] = {}
        self._seen: set[str] = set()
        self._handles: list = []

    def attach(self) -> LayerHooks:
        ref = weakref.ref(self)
        if self.root is not None:
            self._handles.append(self.root.register_forward_pre_hook(_reset(ref)))
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(_forward(ref, layer)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        """Forget the recorded inputs and targets (a new forward)."""
        self.inputs.clear()
        self.targets.clear()
        self._seen.clear()

    def __enter__(self) -> LayerHooks:
        self.clear()
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _record(self, layer: Layer, inputs: tuple, out: Any) -> Any:
        if self.enabled is not None and not self.enabled():
            return None
        if inputs and not isinstance(inputs[0], Tensor) and hasattr(type(inputs[0]), "__torch_function__"):
            raise taylor_pass_error(layer.name, type(inputs[0]).__name__)
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
            return None
        graph = torch.is_grad_enabled() and out.requires_grad
        if not graph and not self.no_grad:
            return None
        if layer.name in self._seen:
            raise weight_shared_error(layer.name, self.hint)
        self._seen.add(layer.name)
        x = inputs[0].detach()
        self.inputs[layer.name] = x
        if not graph:
            return None
        if self.on_grad is not None:
            ref, fn = weakref.ref(self), self.on_grad

            def hook(g: Tensor) -> None:
                if ref() is not None:
                    fn(layer, x, g)

            out.register_hook(hook)
        if self.grad_targets:
            zero = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True).expand(out.shape)
            self.targets[layer.name] = zero
            return out + zero  # the model continues with this sum; in-place ops downstream modify it, not `zero`
        return None


def taylor_pass_error(name: str, what: str) -> LossError:
    return LossError(
        f"layer {name!r} ran on a {what}, a pass that carries derivatives with respect to the inputs "
        "(ck.laplacian's Taylor mode): K-FAC's factors come from the inputs and output gradients of "
        "ordinary forward and backward passes, which a loss built from input derivatives (a PINN "
        "residual) does not reduce to, and Taylor-mode K-FAC is not implemented. Train such a loss with "
        "curvkit's AdaHessian, Shampoo or SOAP (or Adam)"
    )


def _reset(ref: weakref.ref):
    def hook(*_: Any) -> None:
        rec = ref()
        if rec is not None:
            rec._seen.clear()
    return hook


def _forward(ref: weakref.ref, layer: Layer):
    def hook(module: nn.Module, inputs: tuple, out: Any) -> Any:
        rec = ref()
        return None if rec is None else rec._record(layer, inputs, out)
    return hook


__all__ = ["LayerHooks", "weight_shared_error", "taylor_pass_error"]
