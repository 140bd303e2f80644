r"""Kronecker factors of ``nn.Linear`` and ``nn.Conv2d`` layers: the one K-FAC core that
``ck.kfac``, the ``KFAC`` optimizer and EK-FAC share.

A supported layer computes ``s = W~ a~`` per row, with ``W~ = [W | b]`` (the weight flattened to
``(out, in)``, conv kernels as ``(out, C*kh*kw)`` in ``weight.view(out, -1)`` order, and the
bias as a last column) and ``a~ = [a; 1]`` (conv: one unfolded patch per output position). Its
curvature block is approximated by ``A (x) G`` acting on the matrix form ``M = [dW | db]`` as
``M -> G M A``, with (K-FAC, and KFC for convolutions, Grosse & Martens 2016)

    A = 1/N  sum_{n,t} a~_{nt} a~_{nt}^T          (N examples, T positions per example)
    G = 1/T  sum_{j,n,t} g_{jnt} g_{jnt}^T

where ``g_{j..}`` is the gradient with respect to the layer's outputs of the j-th "column"
``u_j^T f`` of the model's output ``f`` (type-2: the columns of a square root of the loss's
output Hessian; Monte-Carlo: sampled residuals; empirical: the loss's own gradient), already
carrying the loss's reduction factor. For one example and one position the block is exact.

Damped inverses are exact for the Kronecker product: with ``A = Q_A D_A Q_A^T`` and
``G = Q_G D_G Q_G^T`` (one ``eigh`` each, :func:`curvkit.approx.matfun.sym_eigh`),
``(A (x) G + lambda I)^{-1} M = Q_G [(Q_G^T M Q_A) / (d_G d_A^T + lambda)] Q_A^T``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from .matfun import sym_eigh, work_dtype

SUPPORTED = (nn.Linear, nn.Conv2d)


def unsupported_reason(module: nn.Module) -> str | None:
    """None if K-FAC handles ``module``; otherwise what it is, for an error message."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped Conv2d (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"a Conv2d with padding_mode={module.padding_mode!r}"
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return "a Conv2d with asymmetric padding='same'"
        return None
    return f"a {type(module).__name__}"


@dataclass(eq=False)
class KronLayer:
    """One supported layer and which of its parameters are chosen (``params`` in chosen order)."""

    name: str
    module: nn.Module
    weight: bool = False
    bias: bool = False
    params: list[str] = field(default_factory=list)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, columns)`` of the full matrix form ``[W | b]``."""
        w = self.module.weight
        return w.shape[0], w[0].numel() + int(self.has_bias)

    def columns(self) -> slice:
        """The columns of ``[W | b]`` (and rows/cols of ``A``) that the chosen parameters use."""
        out, cols = self.shape
        return slice(0 if self.weight else cols - 1, cols if (self.bias or not self.has_bias) else cols - 1)

    def to_matrix(self, parts: list[Tensor]) -> Tensor:
        """Chosen parameters' tensors with a leading batch dim ``(k, *p.shape)`` -> ``(k, out, cols)``."""
        k, out = parts[0].shape[0], self.shape[0]
        mats, i = [], 0
        if self.weight:
            mats.append(parts[i].reshape(k, out, -1))
            i += 1
        if self.bias:
            mats.append(parts[i].reshape(k, out, 1))
        return torch.cat(mats, dim=2) if len(mats) > 1 else mats[0]

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        """Inverse of :meth:`to_matrix`: ``(k, out, cols)`` -> chosen parameters ``(k, *p.shape)``."""
        k, parts = M.shape[0], []
        if self.weight:
            w = self.module.weight
            parts.append(M[:, :, : w[0].numel()].reshape(k, *w.shape))
        if self.bias:
            parts.append(M[:, :, -1])
        return parts


def kron_layers(model: nn.Module, named: list[tuple[str, Tensor]]) -> tuple[list[KronLayer], list[tuple[str, str]]]:
    """Group the chosen ``(name, parameter)`` pairs into supported layers, in the model's order.

    Returns the layers and the ``(parameter name, why not)`` pairs K-FAC cannot handle: a
    parameter of an unsupported module, or one tied between several modules.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, m, attr))
    tied = {id(m) for own in owners.values() if len(own) > 1 for _, m, _ in own}
    layers: dict[int, KronLayer] = {}
    left: list[tuple[str, str]] = []
    for pname, p in named:
        own = owners[id(p)]
        mname, m, attr = own[0]
        shown = f"module {mname or '(root)'!r}"
        if len(own) > 1 or id(m) in tied:
            left.append((pname, f"{shown} shares a parameter with "
                                f"{', '.join(repr(o[0]) for o in own[1:]) or 'another module'} (tied weights)"))
            continue
        why = unsupported_reason(m)
        if why is not None or attr not in ("weight", "bias"):
            left.append((pname, f"{shown} is {why or 'a layer with a parameter ' + repr(attr)}"))
            continue
        layer = layers.setdefault(id(m), KronLayer(mname or "(root)", m))
        setattr(layer, attr, True)
        layer.params.append(pname)
    for layer in layers.values():  # the matrix form puts the weight first whatever the model's order
        layer.params.sort(key=lambda n: n.rpartition(".")[2] != "weight")
    return list(layers.values()), left


def _conv_padding(m: nn.Conv2d) -> Any:
    if m.padding == "valid":
        return 0
    if m.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))
    return m.padding


def input_rows(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """The rows ``a~`` of a layer's input (ones column appended when it has a bias), in the
    working dtype (float32 for bf16, float64 stays), and ``T``, the rows per example.
    Conv2d: ``F.unfold`` patches, one row per output position. Cost: one unfold/copy."""
    x = x.detach().to(work_dtype(x))
    n = x.shape[0]
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input
            x, n = x[None], 1
        cols = F.unfold(x, module.kernel_size, module.dilation, _conv_padding(module), module.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
        n = n if x.dim() > 1 else 1
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows, rows.shape[0] // max(n, 1)


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Gradients w.r.t. a layer's outputs for ``m`` columns, ``(m, *out.shape)`` -> ``(m, rows, out)``
    in the working dtype, rows ordered as in :func:`input_rows`."""
    g = g.detach().to(work_dtype(g))
    m = g.shape[0]
    if isinstance(module, nn.Conv2d):
        c = module.out_channels
        g = g.reshape(m, -1, c, g.shape[-2] * g.shape[-1]).transpose(-1, -2)
        return g.reshape(m, -1, c)
    return g.reshape(m, -1, g.shape[-1])


def activation_factor(rows: Tensor, n: int) -> Tensor:
    """``A = a~^T a~ / N`` from the rows of :func:`input_rows` and the number of examples ``N``."""
    return rows.T @ rows / n


def gradient_factor(grows: Tensor, positions: int) -> Tensor:
    """``G = sum_j g_j^T g_j / T`` from the ``(m, rows, out)`` output gradients of :func:`output_rows`."""
    g = grows.reshape(-1, grows.shape[-1])
    return g.T @ g / positions


def kron_eigen(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_A, Q_A, d_G, Q_G)``: eigen-decompositions of both factors (two ``eigh``)."""
    dA, QA = sym_eigh(A)
    dG, QG = sym_eigh(G)
    return dA, QA, dG, QG


def kron_matmul(M: Tensor, A: Tensor, G: Tensor) -> Tensor:
    """``(A (x) G) vec(M)`` in matrix form: ``G M A`` for ``M`` of shape ``(..., out, cols)``."""
    return G @ M @ A


def kron_solve(M: Tensor, eig: tuple[Tensor, Tensor, Tensor, Tensor], damping: float) -> Tensor:
    """``(A (x) G + damping I)^{-1} vec(M)`` exactly, from :func:`kron_eigen`'s decompositions.

    Eigenvalues are clamped at 0 first (round-off makes PSD factors slightly indefinite).
    Cost: four matrix products per block of ``M``.
    """
    dA, QA, dG, QG = eig
    M = M.to(QA.dtype)
    scale = dG.clamp_min(0)[:, None] * dA.clamp_min(0)[None, :] + damping
    return QG @ ((QG.T @ M @ QA) / scale) @ QA.T


def weight_shared_error(name: str, hint: str) -> ModelError:
    return ModelError(
        f"layer {name!r} is called more than once in one forward pass (weight sharing); K-FAC's "
        f"factors assume one call per forward and would be wrong. {hint}"
    )


class Recorder(contextlib.AbstractContextManager):
    """Forward hooks that keep each layer's input and (graph-attached) output of one forward
    pass; a layer called twice raises :class:`ModelError`. Removed on exit."""

    def __init__(self, layers: list[KronLayer], hint: str):
        self.layers, self.hint = layers, hint
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> Recorder:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def _hook(self, layer: KronLayer):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            if id(module) in self.outputs:
                raise weight_shared_error(layer.name, self.hint)
            self.inputs[id(module)], self.outputs[id(module)] = inputs[0].detach(), out
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
