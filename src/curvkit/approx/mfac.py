r"""M-FAC (Frantar, Kurtic & Alistarh 2021): the empirical Fisher over a sliding window of ``m``
gradients, ``F = damping I + (1/m) sum_i g_i g_i^T``, and its inverse products without forming
a ``d x d`` matrix.

The inverse is the Woodbury identity in a numerically stable form: with the window ``G``
``(m, d)`` (rows ``g_i``), the Gram matrix ``D = G G^T`` and ``K = damping m I + D``,

    ``F^-1 = (I - G^T K^-1 G) / damping``,

computed through the Cholesky factor ``K = L L^T`` (float64, ``m x m``), not the paper's
recursive coefficients (the same ``O(m^2 d)`` setup and ``O(m d)`` products, but no
``m``-step recursion whose rounding grows with ``m``). ``K``'s eigenvalues are at least
``damping m``, so the factor exists for every ``damping > 0``. The diagonal of ``F^-1``
(OBS pruning's ``[F^-1]_qq``) is ``(1 - sum_i W_iq^2) / damping`` with ``W = L^-1 G``: one
triangular solve, ``O(m^2 d)``, then ``O(m d)``.

The blocked variant cuts the flat vector into consecutive blocks of ``block_size`` entries,
each with its own window of the gradients' slices: ``F`` is block-diagonal, every block the
formula above. All blocks are computed together as batched matrices (a padded last block is
dropped from the results); :meth:`MFACOperator.blocks` gives the same operator as a
:class:`~curvkit.linear_operator.BlockDiagonalOperator` of one dense M-FAC operator per block.

:func:`mfac` fills the window with per-example gradients of a model
(:func:`curvkit.model.per_example_gradients`); the ``MFAC`` optimizer and any streaming use
add gradients one at a time with :meth:`MFACOperator.update` (the oldest leaves when full).
The functional pieces (:func:`gram_row`, :func:`woodbury_factor`, :func:`inverse_matmat`)
are what the optimizer shares.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, DataError, NonFiniteError, ShapeError
from ..linear_operator import BlockDiagonalOperator, LinearOperator
from ..model.data import Batches, batch_size, map_tensors
from ..model.params import ParamSpec, resolve_params
from ..model.per_example import per_example_gradients
from ..model.risk import Mode


def _check_damping(damping: Any) -> float:
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0 \
            or damping == float("inf"):
        raise ArgumentError(f"damping must be a finite number > 0 (M-FAC inverts damping I + a rank-m matrix), "
                            f"got {damping!r}")
    return float(damping)


def blocked(G: Tensor, block_size: int) -> Tensor:
    """``(m, d)`` -> ``(nb, m, block_size)``: the window's slices per block, the last padded with zeros."""
    m, d = G.shape
    nb = -(-d // block_size)
    if nb * block_size != d:
        G = torch.nn.functional.pad(G, (0, nb * block_size - d))
    return G.reshape(m, nb, block_size).transpose(0, 1)


_CHUNK = 1 << 22  # window entries converted to float64 at a time by gram_row


def gram_row(Gb: Tensor, g: Tensor) -> Tensor:
    """``(nb, m)``, float64: the products of every window row with a new gradient ``g`` ``(nb, B)``,
    per block: the row and column of the Gram matrix that ``g`` gets. Accumulated in float64 (in
    column chunks of a float64 copy, at most 4M entries at a time): a float32 sum over ``d``
    entries errs by far more than ``damping m`` for large ``d``, which made ``damping m I + G G^T``
    indefinite and ``[F^-1]_qq`` wrong. Cost: ``m d`` multiply-adds."""
    if Gb.dtype == torch.float64 and g.dtype == torch.float64:
        return torch.bmm(Gb, g.unsqueeze(-1)).squeeze(-1)
    nb, m, B = Gb.shape
    step = max(1, _CHUNK // max(1, nb * m))
    out = torch.zeros(nb, m, dtype=torch.float64, device=Gb.device)
    for s in range(0, B, step):
        out += torch.bmm(Gb[..., s:s + step].to(torch.float64), g[:, s:s + step, None].to(torch.float64)).squeeze(-1)
    return out


def woodbury_factor(gram: Tensor, n: int, damping: float) -> Tensor:
    """The Cholesky factor ``L`` ``(nb, n, n)``, float64, of ``damping n I + gram[:, :n, :n]``
    (``gram`` the window's Gram matrices ``G G^T`` per block). Cost: ``nb n^3 / 3`` flops.
    NonFiniteError for a non-finite Gram matrix."""
    K = gram[:, :n, :n].to(torch.float64)
    K = 0.5 * (K + K.transpose(-1, -2)) + damping * n * torch.eye(n, dtype=K.dtype, device=K.device)
    L, info = torch.linalg.cholesky_ex(K)
    if bool((info != 0).any()):
        if not bool(torch.isfinite(K).all()):
            raise NonFiniteError("the M-FAC window holds NaN/inf gradients; check the loss and the data")
        raise NonFiniteError(f"damping {damping:g} * m I + G G^T is not positive definite in float64 "
                             "(a gradient of huge norm?); raise damping")
    return L


def inverse_matmat(Gb: Tensor, L: Tensor | None, damping: float, V: Tensor) -> Tensor:
    """``F^-1 V`` for ``V`` ``(nb, B, k)`` with the window ``Gb`` ``(nb, n, B)`` (its ``n`` filled
    rows) and ``L`` from :func:`woodbury_factor` (None for an empty window: ``V / damping``).
    Cost: ``2 n d k`` multiply-adds plus two ``n x n`` triangular solves per block."""
    if L is None:
        return V / damping
    GV = torch.bmm(Gb, V).to(torch.float64)
    C = torch.cholesky_solve(GV, L).to(V.dtype)
    return (V - torch.bmm(Gb.transpose(-1, -2), C)) / damping


class MFACOperator(LinearOperator):
    r"""``F = damping I + (1/n) sum_i g_i g_i^T`` over the ``n <= window`` gradients held (the
    empirical Fisher of the window), block-diagonal with blocks of ``block_size`` when given.

    ``gradients`` ``(k, d)``: the first window (``window`` defaults to ``k``; at most
    ``window`` rows, the last ones kept). Or an empty window of ``dim`` entries, filled by
    :meth:`update`. ``.inverse()`` is ``F^-1`` as an operator (:class:`MFACInverse`, with
    ``.diagonal()``); ``.diagonal()`` is ``F``'s diagonal. Both follow later updates.

    Memory: the window, ``window * d`` numbers, and ``nb window^2`` float64 for the Gram
    matrices (``nb`` the number of blocks, 1 without ``block_size``). Cost: a product with ``V (d, k)``
    is ``2 n d k`` multiply-adds (no pass over data); the inverse's first product after an
    update also factors ``K`` (``nb n^3/3`` flops); :meth:`update` costs ``n d``.

    Example:
        >>> import torch
        >>> from curvkit.approx.mfac import MFACOperator
        >>> G = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> F = MFACOperator(G, damping=0.1)
        >>> dense = 0.1 * torch.eye(5, dtype=torch.float64) + G.T @ G / 3
        >>> bool(torch.allclose(F.dense(), dense)), bool(torch.allclose(F.inverse().dense(), dense.inverse()))
        (True, True)
        >>> bool(torch.allclose(F.inverse().diagonal(), dense.inverse().diagonal()))
        True
    """

    exact_products = False

    def __init__(self, gradients: Tensor | None = None, *, damping: float, window: int | None = None,
                 dim: int | None = None, block_size: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.damping = _check_damping(damping)
        if gradients is not None:
            if not isinstance(gradients, Tensor) or gradients.dim() != 2 or not gradients.is_floating_point():
                got = tuple(gradients.shape) if isinstance(gradients, Tensor) else type(gradients).__name__
                raise ShapeError(f"gradients must be a floating (k, d) tensor, one gradient a row; got {got}")
            dim, dtype, device = gradients.shape[1], gradients.dtype, gradients.device
            window = gradients.shape[0] if window is None else window
        elif dim is None or window is None:
            raise ArgumentError("MFACOperator needs gradients (k, d), or dim= and window= for an empty window")
        for name, v in (("window", window), ("dim", dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArgumentError(f"{name} must be a positive integer, got {v!r}")
        if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                       or block_size < 1):
            raise ArgumentError(f"block_size must be a positive integer or None (one dense block), got {block_size!r}")
        self.window, self.block_size = window, min(block_size or dim, dim)
        dtype = dtype or torch.get_default_dtype()
        self.shape, self.dtype, self.device = (dim, dim), dtype, torch.device(device or "cpu")
        nb = -(-dim // self.block_size)
        self._G = torch.zeros(nb, window, self.block_size, dtype=dtype, device=self.device)
        self._gram = torch.zeros(nb, window, window, dtype=torch.float64, device=self.device)  # see gram_row
        self.count, self._next = 0, 0
        self._L: Tensor | None = None
        if gradients is not None:
            for g in gradients[-window:]:
                self.update(g)

    # the window ----------------------------------------------------------------------------
    def update(self, g: Tensor) -> None:
        """Add the gradient ``g`` ``(d,)`` to the window; when full it replaces the oldest.
        Cost: ``window * d`` multiply-adds (one new Gram row per block)."""
        if not isinstance(g, Tensor) or g.shape != (self.shape[0],):
            raise ShapeError(f"a gradient must be a flat ({self.shape[0]},) tensor, got "
                             f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
        gb = blocked(g.detach().to(self.dtype, copy=False)[None], self.block_size)[:, 0]  # (nb, B)
        i = self._next
        self._G[:, i] = gb
        row = gram_row(self._G, gb)
        self._gram[:, i, :] = row
        self._gram[:, :, i] = row
        self._next = (i + 1) % self.window
        self.count = min(self.count + 1, self.window)
        self._L = None

    @property
    def gradients(self) -> Tensor:
        """The ``(n, d)`` gradients held (in slot order, not arrival order)."""
        n, d = self.count, self.shape[0]
        return self._G[:, :n].transpose(0, 1).reshape(n, -1)[:, :d]

    def _rows(self) -> Tensor:
        return self._G[:, : self.count]

    def _factor(self) -> Tensor | None:
        if self.count == 0:
            return None
        if self._L is None:
            self._L = woodbury_factor(self._gram, self.count, self.damping)
        return self._L

    def _blocked(self, V: Tensor) -> Tensor:  # (d, k) -> (nb, B, k)
        return blocked(V.T, self.block_size).transpose(-1, -2)

    def _unblocked(self, X: Tensor) -> Tensor:  # (nb, B, k) -> (d, k)
        return X.reshape(-1, X.shape[-1])[: self.shape[0]]

    # products ------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        Vb = self._blocked(V)
        out = self.damping * Vb
        if self.count:
            G = self._rows()
            out = out + torch.bmm(G.transpose(-1, -2), torch.bmm(G, Vb)) / self.count
        return self._unblocked(out)

    def diagonal(self) -> Tensor:
        """``F``'s diagonal ``(d,)``: ``damping + mean_i g_i^2``. Cost: ``n d``."""
        sq = (self._rows() ** 2).sum(1) / max(self.count, 1)
        return self.damping + sq.reshape(-1)[: self.shape[0]]

    def inverse(self) -> MFACInverse:
        """``F^-1`` as an operator (exact for this ``F``, by Woodbury). Free to build."""
        return MFACInverse(self)

    def blocks(self) -> BlockDiagonalOperator:
        """The same ``F`` as a :class:`BlockDiagonalOperator` of one dense M-FAC operator per block
        (a snapshot of the window), named ``"start:stop"``. Cost: copies the window."""
        d, B, G = self.shape[0], self.block_size, self.gradients
        parts = {}
        for s in range(0, d, B):
            e = min(s + B, d)
            op = MFACOperator(dim=e - s, window=self.window, damping=self.damping, dtype=self.dtype,
                              device=self.device)
            for g in G:
                op.update(g[s:e])
            parts[f"{s}:{e}"] = op
        return BlockDiagonalOperator(parts)


class MFACInverse(LinearOperator):
    """``F^-1`` of an :class:`MFACOperator` (it follows the window's updates). Products cost
    ``2 n d k`` multiply-adds and two ``n x n`` triangular solves per block; the first after an
    update also the Cholesky factor."""

    exact_products = False

    def __init__(self, F: MFACOperator):
        self.F = F
        self.shape, self.dtype, self.device = F.shape, F.dtype, F.device

    def _matmat(self, V: Tensor) -> Tensor:
        F = self.F
        return F._unblocked(inverse_matmat(F._rows(), F._factor(), F.damping, F._blocked(V)))

    def diagonal(self) -> Tensor:
        """``[F^-1]_qq`` for every ``q`` ``(d,)``: ``(1 - sum_i W_iq^2) / damping``, ``W = L^-1 G``.
        Cost: one triangular solve with the window, ``n^2 d`` multiply-adds; memory ``n d``."""
        F = self.F
        L = F._factor()
        if L is None:
            return torch.full((F.shape[0],), 1.0 / F.damping, dtype=F.dtype, device=F.device)
        W = torch.linalg.solve_triangular(L, F._rows().to(torch.float64), upper=False)
        diag = ((1.0 - (W**2).sum(1)) / F.damping).to(F.dtype)
        return diag.reshape(-1)[: F.shape[0]]

    def inverse(self) -> MFACOperator:
        return self.F


def mfac(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, window: int = 64,
         damping: float = 1e-4, block_size: int | None = None, mode: Mode = "eval", reduction: str | None = None,
         output: Any = None, max_batch: int | None = None) -> MFACOperator:
    r"""The M-FAC empirical Fisher of ``loss_fn(model(inputs), targets)``: a window of the
    per-example gradients (each example's own loss, its terms summed; see
    :func:`curvkit.model.per_example_gradients`) of the FIRST ``window`` examples of ``data``, in
    its order (shuffle the data to draw others). With one term per example and ``window`` at
    least the number of examples, ``F - damping I`` is exactly ``ck.fisher(..., kind="empirical")``.
    ``block_size``: the blocked variant (independent windows over consecutive slices).

    ``.inverse()`` gives ``F^-1`` (``.diagonal()``: ``[F^-1]_qq``). ``.param_names`` are the
    chosen parameters, in the flat vector's order. A snapshot: the gradients are those of the
    weights at construction.

    Cost: forward and backward passes over the batches until ``window`` examples are seen (only
    as many batches as needed), vmapped per example. Memory: ``window * d`` numbers.

    Example:
        >>> import torch, curvkit as ck
        >>> from curvkit.approx.mfac import mfac
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3).double(), torch.randint(0, 2, (8,))
        >>> F = mfac(model, torch.nn.CrossEntropyLoss(), (x, y), window=8, damping=1e-3)
        >>> E = ck.fisher(model, torch.nn.CrossEntropyLoss(), (x, y)).dense()
        >>> bool(torch.allclose(F.dense(), E + 1e-3 * torch.eye(8, dtype=torch.float64)))
        True
    """
    _check_damping(damping)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ArgumentError(f"window must be a positive integer (the number of gradients), got {window!r}")
    named = resolve_params(model, params)
    names = [n for n, _ in named]
    rows, seen = [], 0
    for i, x, y in Batches(data):
        take = min(batch_size(x, y, i), window - seen)
        xs = map_tensors(lambda t: t[:take], x)
        rows.append(per_example_gradients(model, loss_fn, (xs, y[:take]), names, mode=mode, reduction=reduction,
                                          output=output, max_batch=max_batch))
        seen += take
        if seen >= window:
            break
    if not rows:
        raise DataError("data holds no examples; M-FAC needs at least one gradient")
    G = torch.cat(rows)
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteError("a per-example gradient has NaN/inf entries; check the loss and the data")
    op = MFACOperator(G, damping=damping, window=window, block_size=block_size)
    op.param_names = names
    return op


__all__ = ["MFACOperator", "MFACInverse", "mfac", "woodbury_factor", "inverse_matmat", "gram_row", "blocked"]
