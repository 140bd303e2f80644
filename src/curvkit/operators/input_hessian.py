r"""The Hessian of a function with respect to its inputs, per example, as a linear operator.

For ``f`` mapping a batch ``x`` ``(B, *s)`` to ``(B,)`` (one number per example) or ``(B, m)``
(a vector per example), the input Hessians ``H_b = d^2 f(x)_b / dx_b^2`` (``d x d``, ``d =
prod(s)``) of all examples form one block-diagonal operator over the flat input space (``B d``
numbers, example-major: a vector is ``v.reshape(B, *s)`` flattened, ``(B, m, *s)`` for vector
outputs). ``H.blocks("example")`` hands out the blocks, one ``d x d`` operator per example
(per example and output component, named ``"b,k"``, for vector outputs), so every algorithm of
:mod:`curvkit.linalg` runs per example: ``ck.eigenvalues(H, k=2, by="example")``,
``ck.trace(H, by="example")``, ``ck.diagonal(H, by="example")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError, ShapeError
from ..linear_operator import BlockDiagonalOperator, LinearOperator
from ..model.params import VectorSpace

__all__ = ["InputHessianOperator", "input_hessian"]


class InputHessianOperator(LinearOperator):
    r"""Block-diagonal ``diag(H_1, ..., H_B)`` of per-example input Hessians (see the module
    docstring for the layout). ``f`` must treat examples independently (no batch statistics):
    a product differentiates ``sum_b f(x)_b``, whose Hessian is block-diagonal only then.

    Products are forward-over-reverse (``torch.func.jvp`` of the input gradient), vmapped over
    the probe columns (and the output components). The operator follows ``f``'s live
    parameters. ``x`` need not require grad.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor):
        _check_x(f, x)
        with torch.no_grad():
            out = f(x)
        B = x.shape[0]
        if not isinstance(out, Tensor) or out.dim() not in (1, 2) or out.shape[0] != B:
            raise ShapeError(
                f"f must return one number (B,) or one vector (B, m) per example for x of batch size {B}, got "
                f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}; flatten other outputs per example"
            )
        self.f, self.x = f, x.detach()
        self.m = 1 if out.dim() == 1 else out.shape[1]
        self._vector = out.dim() == 2 and self.m > 1
        self.d = math.prod(x.shape[1:])
        shape = (B, self.m, *x.shape[1:]) if self._vector else tuple(x.shape)
        self.space = VectorSpace(["x"], [torch.Size(shape)], x.dtype, x.device)
        n = self.space.dim
        self.shape, self.dtype, self.device = (n, n), x.dtype, x.device
        self.is_symmetric = True

    def _products(self, x: Tensor, V: Tensor) -> Tensor:
        """``V`` (p, B', m, *s) -> the per-example, per-output Hessian products, same shape."""
        f = self.f

        def grad_k(u: Tensor, e: Tensor) -> Tensor:
            return torch.func.vjp(lambda z: _as_2d(f(z)), u)[1](e)[0]

        def hvp(t: Tensor, e: Tensor) -> Tensor:
            return torch.func.jvp(lambda u: grad_k(u, e), (x,), (t,))[1]

        E = torch.eye(self.m, dtype=x.dtype, device=x.device)[:, None, :].expand(self.m, x.shape[0], self.m)
        per_output = torch.vmap(hvp, in_dims=(1, 0), out_dims=1)   # over the m outputs
        return torch.vmap(per_output, in_dims=(0, None))(V, E).detach()

    def _matmat(self, V: Tensor) -> Tensor:
        B, p = self.x.shape[0], V.shape[1]
        T = V.T.reshape(p, B, self.m, *self.x.shape[1:])
        return self._products(self.x, T).reshape(p, -1).T

    def blocks(self, by: str = "example") -> BlockDiagonalOperator:
        """One ``d x d`` operator per example (``"b"``), or per example and output (``"b,k"``)
        for vector outputs; a block's product runs ``f`` on that example alone."""
        if by != "example":
            raise ArgumentError(f"an input Hessian has blocks by='example' only, got by={by!r}")
        out = {}
        for b in range(self.x.shape[0]):
            for k in range(self.m):
                name = f"{b},{k}" if self._vector else str(b)
                out[name] = _Block(self, b, k)
        return BlockDiagonalOperator(out)


class _Block(LinearOperator):
    """The input Hessian of output ``k`` of example ``b``, computed on that example alone."""

    def __init__(self, H: InputHessianOperator, b: int, k: int):
        self.H, self.b, self.k = H, b, k
        self.shape, self.dtype, self.device = (H.d, H.d), H.dtype, H.device
        self.is_symmetric = True

    def _matmat(self, V: Tensor) -> Tensor:
        H, p = self.H, V.shape[1]
        x = H.x[self.b:self.b + 1]
        T = torch.zeros(p, 1, H.m, *x.shape[1:], dtype=V.dtype, device=V.device)
        T[:, 0, self.k] = V.T.reshape(p, *x.shape[1:])
        return H._products(x, T)[:, 0, self.k].reshape(p, -1).T


def _as_2d(out: Tensor) -> Tensor:
    return out[:, None] if out.dim() == 1 else out


def _check_x(f, x) -> None:
    if not callable(f):
        raise ArgumentError(f"f must be a callable x -> f(x), got {type(f).__name__}")
    if not isinstance(x, Tensor):
        raise ShapeError(f"x must be a torch.Tensor batch (B, d), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ShapeError(f"x must be floating point to be differentiated, got {x.dtype}; use x.float() or x.double()")
    if x.dim() < 2:
        raise ShapeError(f"x must be a batch of shape (B, d) (or (B, *s)), got {tuple(x.shape)}; for one point "
                         "use x[None], for B points in one dimension x[:, None]")


def input_hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> InputHessianOperator:
    r"""The per-example Hessians of ``f`` with respect to its inputs ``x`` ``(B, *s)``, as one
    block-diagonal operator over the flat input space (see :class:`InputHessianOperator`).

    Cost: one forward of ``f`` to check its output; a product with ``p`` columns is one
    vmapped forward-over-reverse pass over the batch (about 3-4 forwards per column and output);
    a block's product (``H.blocks("example")[name]``) is the same on one example. Memory: that
    of one such pass; nothing ``d x d`` is formed unless asked (``.dense()``).

    Example:
        >>> import torch, curvkit as ck
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> x = torch.rand(4, 3, dtype=torch.float64)
        >>> H = ck.input_hessian(net, x)
        >>> H.shape, len(H.blocks("example"))
        ((12, 12), 4)
        >>> top = ck.eigenvalues(H, k=1, by="example")["2"].values            # example 2's top eigenvalue
        >>> ref = torch.autograd.functional.hessian(lambda p: net(p[None])[0, 0], x[2])
        >>> bool(torch.isclose(top[0], torch.linalg.eigvalsh(ref)[-1]))
        True
    """
    return InputHessianOperator(f, x)
