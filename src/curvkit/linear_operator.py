"""Linear operators and their algebra. Knows nothing of neural networks.

:class:`LinearOperator` is what every algorithm in :mod:`curvkit.linalg` consumes: ``shape``,
``dtype``, ``device`` and ``@`` on a vector ``(n,)`` or a block ``(n, k)``. Operators compose
(``H + 1e-3 * identity_like(H)``, ``2 * H``, ``A @ B``, ``A.T``) so damping needs no special code,
and each knows whether it is symmetric (:attr:`LinearOperator.is_symmetric`) and what its adjoint
is (:meth:`LinearOperator.adjoint`), so that algorithms which need symmetry can refuse the rest
and ``to_scipy().rmatvec`` multiplies by the transpose.

Example:
    >>> import torch
    >>> from curvkit.linear_operator import FunctionOperator, identity_like
    >>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> A = FunctionOperator(lambda V: M @ V, 2, torch.float64)    # symmetric unless told otherwise
    >>> D = A + 0.5 * identity_like(A)                              # damping needs no special code
    >>> D @ torch.ones(2, dtype=torch.float64)
    tensor([3.5000, 4.5000], dtype=torch.float64)
    >>> D.is_symmetric, (D @ D).is_symmetric, (A @ D).is_symmetric  # a product of two is not assumed
    (True, True, False)
    >>> K = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    >>> N = FunctionOperator(lambda V: K @ V, 2, torch.float64, symmetric=False, rmatmat=lambda V: K.T @ V)
    >>> N.T @ torch.tensor([1.0, 0.0], dtype=torch.float64)       # the adjoint: K^T e_1
    tensor([1., 2.], dtype=torch.float64)
    >>> (A @ N).to_scipy().rmatvec([1.0, 0.0])                    # (A N)^T x = N^T A^T x
    array([2., 5.])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ArgumentError, ShapeError, TooLargeError


_HALF = (torch.float16, torch.bfloat16)  # operators of these dtypes also take float32 vectors


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two device specs name one device: ``"cuda"`` is ``"cuda:0"`` when 0 is current."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


class LinearOperator:
    """An ``m x n`` linear map on flat torch vectors; subclasses implement :meth:`_matmat`.

    Subclasses that are not symmetric set :attr:`is_symmetric` to False and implement
    :meth:`_rmatmat` (the product with the transpose), or leave it out if they have none.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    is_symmetric: bool = True
    # whether products carry no rounding beyond their dtype's (None: unknown, the algorithms guess)
    exact_products: bool | None = None

    def _matmat(self, V: Tensor) -> Tensor:  # V: (n, k), already checked
        raise NotImplementedError

    def _rmatmat(self, V: Tensor) -> Tensor:  # A^T V; V: (m, k)
        if self.is_symmetric:
            return self._matmat(V)
        raise ArgumentError(
            f"{type(self).__name__} is not symmetric and has no product with its transpose; wrap "
            "your product in FunctionOperator(..., rmatmat=...) to give one"
        )

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        V = self._check_input(other, self.shape[1])
        return self._matmat(V[:, None])[:, 0] if V.dim() == 1 else self._matmat(V)

    def retaining(self) -> contextlib.AbstractContextManager:
        """A context in which products may keep work for the next product and free it at the exit
        (the Hessian keeps each batch's gradient graph: :meth:`HessianOperator.retaining
        <curvkit.operators.HessianOperator.retaining>`). Every algorithm of :mod:`curvkit.linalg`
        that makes several products runs inside it; around several algorithms on one operator
        (``with H.retaining(): ...``) the work is kept across them. Here: the operands' contexts
        (a sum, a scaling, a product), else nothing."""
        stack = contextlib.ExitStack()
        for op in self._operands():
            stack.enter_context(op.retaining())
        return stack

    def _operands(self) -> tuple[LinearOperator, ...]:
        """The operators this one multiplies by in each of its products (composites' parts)."""
        return ()

    def rmatmat(self, V: Tensor) -> Tensor:
        """``A^T @ V`` for a vector ``(m,)`` or a block ``(m, k)``: the adjoint's product."""
        V = self._check_input(V, self.shape[0])
        return self._rmatmat(V[:, None])[:, 0] if V.dim() == 1 else self._rmatmat(V)

    def _check_input(self, v: Any, n: int) -> Tensor:
        if not isinstance(v, Tensor):
            hint = " (use .to_scipy() for numpy arrays, or torch.as_tensor(v))" if isinstance(v, np.ndarray) else ""
            raise ShapeError(f"expected a torch.Tensor of shape ({n},) or ({n}, k), got {type(v).__name__}{hint}")
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise ShapeError(
                f"expected a vector of shape ({n},) or a block ({n}, k), got {tuple(v.shape)}; "
                "vectors are flat over the operator's parameters (see .split / .flatten)"
            )
        if v.dtype != self.dtype and not (self.dtype in _HALF and v.dtype == torch.float32):
            raise ShapeError(f"vector dtype {v.dtype} does not match the operator's {self.dtype}; use v.to({self.dtype})")
        if not same_device(v.device, self.device):
            raise ShapeError(f"vector is on {v.device} but the operator on {self.device}; use v.to('{self.device}')")
        return v

    # algebra ----------------------------------------------------------------------------
    def adjoint(self) -> LinearOperator:
        """The transpose ``A^T`` (the operator itself when symmetric). Free."""
        return self if self.is_symmetric else AdjointOperator(self)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 (numpy's name)
        return self.adjoint()

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __mul__(self, c: float) -> LinearOperator:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = c.item()
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __truediv__(self, c: float) -> LinearOperator:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = c.item()
        if not isinstance(c, (int, float)) or isinstance(c, bool) or c == 0:
            raise ArgumentError(f"an operator can be divided by a nonzero number only, got {c!r}")
        return ScaledOperator(self, 1.0 / float(c))

    # conversions ------------------------------------------------------------------------
    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` that takes and returns numpy arrays; its
        ``rmatvec``/``rmatmat`` multiply by the transpose. Each scipy product is one product of
        this operator (a block for ``matmat``)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        dt = torch.float32 if self.dtype in _HALF else self.dtype  # numpy has no bf16; products are float32
        np_dtype = torch.empty(0, dtype=dt).numpy().dtype

        def wrap(fn: Callable[[Tensor], Tensor]) -> Callable[[np.ndarray], np.ndarray]:
            def mm(X: np.ndarray) -> np.ndarray:
                V = torch.as_tensor(np.ascontiguousarray(X), dtype=dt, device=self.device)
                return fn(V).detach().to(dt).cpu().numpy()
            return mm

        mv, rmv = wrap(self.__matmul__), wrap(self.rmatmat)
        return ScipyOperator(self.shape, matvec=mv, rmatvec=rmv, matmat=mv, rmatmat=rmv, dtype=np_dtype)

    def dense(self, max_size: int = 4096, chunk: int = 64) -> Tensor:
        """The full matrix, for small problems and tests.

        Cost: n operator products, in blocks of ``chunk`` columns. Refuses ``n > max_size``
        (n^2 numbers and n products); raise ``max_size`` if you really want it.
        """
        m, n = self.shape
        if max(m, n) > max_size:
            gib = m * n * torch.empty(0, dtype=self.dtype).element_size() / 2**30
            raise TooLargeError(
                f"a dense {m} x {n} matrix ({gib:.1f} GiB, {n} products) exceeds max_size={max_size}; "
                "use matrix-free algorithms (ck.eigenvalues, ck.trace, ...) or pass a larger max_size"
            )
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        with self.retaining():
            return torch.cat([self @ eye[:, i : i + chunk] for i in range(0, n, chunk)], dim=1)

    def __repr__(self) -> str:
        sym = "" if self.is_symmetric else ", not symmetric"
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device}{sym})"


def _same_space(a: LinearOperator, b: LinearOperator, inner: bool = False) -> None:
    ok = (a.shape[1] == b.shape[0]) if inner else (a.shape == b.shape)
    if not ok or a.dtype != b.dtype or not same_device(a.device, b.device):
        raise ShapeError(
            f"cannot combine operators of shape/dtype/device {a.shape}/{a.dtype}/{a.device} and "
            f"{b.shape}/{b.dtype}/{b.device}"
        )


class SumOperator(LinearOperator):
    """``A + B``: one product with each per product."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        _same_space(A, B)
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device
        self.is_symmetric = A.is_symmetric and B.is_symmetric
        self.exact_products = _both_exact(A, B)

    def _operands(self) -> tuple[LinearOperator, ...]:
        return self.A, self.B

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V + self.B @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.A.rmatmat(V) + self.B.rmatmat(V)


class ScaledOperator(LinearOperator):
    """``c * A``."""

    def __init__(self, A: LinearOperator, c: float):
        self.A, self.c = A, c
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device
        self.is_symmetric = A.is_symmetric
        self.exact_products = A.exact_products

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.A,)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.c * (self.A @ V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.c * self.A.rmatmat(V)


class ProductOperator(LinearOperator):
    """``A @ B`` applied right to left; ``(A B)^T = B^T A^T``. Symmetric when it is ``A @ A`` of
    a symmetric ``A``, one factor is the identity of a symmetric other, or it is the congruence
    ``X @ Y @ X`` (either grouping) of symmetric ``X`` and ``Y`` (e.g. a preconditioned
    ``D^-1/2 H D^-1/2`` with a :class:`DiagonalOperator` ``D^-1/2``)."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        _same_space(A, B, inner=True)
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = (A.shape[0], B.shape[1]), A.dtype, A.device
        ident = isinstance(A, IdentityOperator) or isinstance(B, IdentityOperator)
        self.is_symmetric = (A.is_symmetric and B.is_symmetric and (A is B or ident)) or _congruence(A, B)
        self.exact_products = _both_exact(A, B)

    def _operands(self) -> tuple[LinearOperator, ...]:
        return self.A, self.B

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ (self.B @ V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.B.rmatmat(self.A.rmatmat(V))


def _congruence(A: LinearOperator, B: LinearOperator) -> bool:
    """Whether ``A @ B`` is ``X @ Y @ X`` with symmetric ``X`` and ``Y``: ``(X Y) X`` or ``X (Y X)``."""
    if isinstance(A, ProductOperator) and A.A is B:
        X, Y = B, A.B
    elif isinstance(B, ProductOperator) and B.B is A:
        X, Y = A, B.A
    else:
        return False
    return bool(X.is_symmetric and Y.is_symmetric and X.shape[0] == X.shape[1])


class DiagonalOperator(LinearOperator):
    """``diag(d)`` for a vector ``d`` (n,): a product is an elementwise scaling (no pass over data).

    Example:
        >>> import torch
        >>> from curvkit.linear_operator import DiagonalOperator, FunctionOperator
        >>> D = DiagonalOperator(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> A = FunctionOperator(lambda V: V.flip(0), 2, torch.float64)
        >>> (D @ A @ D).is_symmetric, D @ torch.ones(2, dtype=torch.float64)
        (True, tensor([1., 2.], dtype=torch.float64))
    """

    exact_products = True

    def __init__(self, d: Tensor):
        if not isinstance(d, Tensor) or d.dim() != 1:
            raise ShapeError(f"a diagonal operator takes a 1-D tensor, got "
                             f"{tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__}")
        self.diagonal = d.detach()
        n = d.shape[0]
        self.shape, self.dtype, self.device = (n, n), d.dtype, d.device

    def _matmat(self, V: Tensor) -> Tensor:
        return V * self.diagonal.to(V.dtype)[:, None]


class AdjointOperator(LinearOperator):
    """``A^T`` of a non-symmetric ``A``: products are ``A``'s transposed products."""

    def __init__(self, A: LinearOperator):
        self.A = A
        self.shape, self.dtype, self.device = (A.shape[1], A.shape[0]), A.dtype, A.device
        self.is_symmetric = False

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.A,)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A.rmatmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def adjoint(self) -> LinearOperator:
        return self.A


def _both_exact(A: LinearOperator, B: LinearOperator) -> bool | None:
    a, b = A.exact_products, B.exact_products
    return False if a is False or b is False else (True if a and b else None)


class IdentityOperator(LinearOperator):
    """The n x n identity (free: no product)."""

    exact_products = True

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.shape, self.dtype, self.device = (n, n), dtype, torch.device(device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


def identity_like(A: LinearOperator) -> IdentityOperator:
    """The identity in ``A``'s space, for damping: ``H + 1e-3 * identity_like(H)``."""
    return IdentityOperator(A.shape[0], A.dtype, A.device)


class FunctionOperator(LinearOperator):
    """Wrap a function ``V (n, k) -> (m, k)`` as an operator (e.g. a product you wrote yourself).

    ``symmetric`` (default True, as for curvature matrices) says whether the function is a
    symmetric matrix; a non-symmetric one gives ``rmatmat`` (its transpose's product) if it has
    one. ``shape`` defaults to square ``(n, n)``.
    """

    def __init__(self, matmat: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype, device="cpu", *,
                 symmetric: bool = True, rmatmat: Callable[[Tensor], Tensor] | None = None,
                 shape: tuple[int, int] | None = None):
        self._fn, self._rfn = matmat, rmatmat
        self.shape, self.dtype, self.device = shape or (n, n), dtype, torch.device(device)
        self.is_symmetric = bool(symmetric) and self.shape[0] == self.shape[1]

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V if V.dtype == self.dtype else V.to(self.dtype))  # the function sees its own dtype

    def _rmatmat(self, V: Tensor) -> Tensor:
        if self._rfn is None:
            return super()._rmatmat(V)
        return self._rfn(V if V.dtype == self.dtype else V.to(self.dtype))


class BlockDiagonalOperator(LinearOperator, Mapping):
    """``diag(B_1, ..., B_m)`` over consecutive slices of the flat vector: one product of each
    block per product. Also a read-only mapping ``name -> block`` in order (``ops.items()``), which
    is how ``by="layer"`` runs a linear-algebra function once per block (``ck.trace(H, by="layer")``
    iterates ``H.blocks("layer").items()``; ``ck.trace(H.blocks("layer"))`` is one trace of the
    whole block-diagonal matrix)."""

    def __init__(self, blocks: Mapping[str, LinearOperator]):
        if not blocks:
            raise ArgumentError("a block-diagonal operator needs at least one block")
        self._blocks = dict(blocks)
        first = next(iter(self._blocks.values()))
        for B in self._blocks.values():
            if B.shape[0] != B.shape[1] or B.dtype != first.dtype or not same_device(B.device, first.device):
                raise ShapeError("blocks must be square and share one dtype and device")
        self._sizes = [B.shape[0] for B in self._blocks.values()]
        n = sum(self._sizes)
        self.shape, self.dtype, self.device = (n, n), first.dtype, first.device
        self.is_symmetric = all(B.is_symmetric for B in self._blocks.values())

    # retaining() does not enter the blocks: each would keep its own graphs of every batch, a
    # multiple of one operator's memory; by="layer" runs enter one block at a time instead

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.cat([B @ part for B, part in zip(self._blocks.values(), V.split(self._sizes))])

    def _rmatmat(self, V: Tensor) -> Tensor:
        return torch.cat([B.rmatmat(part) for B, part in zip(self._blocks.values(), V.split(self._sizes))])

    def __getitem__(self, name: str) -> LinearOperator:
        return self._blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    __hash__ = object.__hash__  # Mapping sets __hash__ = None; operators are identities
    __eq__ = object.__eq__


__all__ = [
    "LinearOperator", "SumOperator", "ScaledOperator", "ProductOperator", "AdjointOperator", "IdentityOperator",
    "FunctionOperator", "BlockDiagonalOperator", "DiagonalOperator", "identity_like", "same_device",
]
