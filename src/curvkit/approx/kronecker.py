r"""Kronecker factors of ``nn.Linear`` and ``nn.Conv2d`` layers: the one K-FAC core that
``ck.kfac``, the ``KFAC`` optimizer and EK-FAC share.

A supported layer computes ``s = W~ a~`` per row, with ``W~ = [W | b]`` (the weight flattened to
``(out, in)``, conv kernels as ``(out, C*kh*kw)`` in ``weight.view(out, -1)`` order, and the
bias as a last column) and ``a~ = [a; 1]`` (conv: one unfolded patch per output position). Its
curvature block is approximated by ``A (x) G`` acting on the matrix form ``M = [dW | db]`` as
``M -> G M A`` (the matrix view of :class:`curvkit.model.layers.Layer`), with (K-FAC, and KFC for convolutions, Grosse & Martens 2016)

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.layers import Layer, layers
from .matfun import sym_eigh, work_dtype


def kron_layers(model: nn.Module, named: list[tuple[str, Tensor]]) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The layers (:func:`curvkit.model.layers`) holding the chosen ``(name, parameter)`` pairs
    that K-FAC handles, in the model's order, and the ``(parameter name, why not)`` pairs it
    cannot: a parameter of an unsupported module, or one tied between several modules."""
    ok, left = [], []
    for layer in layers(model, named):
        why = layer.kron_reason()
        if why is None:
            ok.append(layer)
        else:
            left += [(n, why) for n in layer.param_names]
    return ok, left


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
