"""Extreme eigenpairs of a symmetric operator: block Lanczos with thick restarts."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ..progress import progress as progress_bar
from ..errors import ArgumentError, ConvergenceWarning, ShapeError
from ._util import apply, check_square, check_symmetric, gaussian, generator, operator_blocks
from .results import BlockResults, EigenResult

Which = Literal["largest", "smallest", "magnitude"]
_WHICH = ("largest", "smallest", "magnitude")
_F64 = torch.float64


def eigenvalues(
    A: Any,
    k: int = 5,
    which: Which = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int | torch.Generator | None = 0,
    block_size: int | None = None,
    basis_size: int | None = None,
    by: str | None = None,
    progress: bool | None = None,
) -> EigenResult | BlockResults:
    r"""The ``k`` extreme eigenpairs of a symmetric (possibly indefinite) operator.

    Block Lanczos with full reorthogonalization and thick restarts (Krylov-Schur): the basis
    grows by blocks of ``block_size`` columns up to ``basis_size``, then shrinks to the best
    Ritz vectors, which keeps the Krylov information a plain restart would throw away.
    ``which`` is "largest" (algebraic, values descending), "smallest" (algebraic, ascending) or
    "magnitude" (largest ``|lambda|``, descending by absolute value).

    Converged when every wanted pair has ``||A v - lambda v|| <= tol * max|lambda|`` (the max
    over the wanted values, so eigenvalues near 0 do not stall convergence). ``residuals`` are
    the norms ``||A v - lambda v||`` of the returned vectors, read off the Lanczos relation
    ``A V = V H + R E^T`` (equal to the directly computed ones up to rounding, at no extra cost).

    Cost: at most ``max_matvecs`` operator products (default ``max(1000, 50 * basis_size)``),
    counted as columns: one block product of ``b`` columns counts ``b``; typically a few times
    ``k`` to a few ``basis_size``. Memory: ``basis_size + block_size`` vectors of length n.
    If ``basis_size + block_size >= n`` the operator is small: it is formed densely with ``n``
    products and solved exactly. A budget that runs out returns ``converged=False`` with a
    :class:`~curvkit.errors.ConvergenceWarning`, the residuals saying how far it got.

    With ``by="layer"`` or ``"param"``, runs once per diagonal block of ``A.blocks(by)`` and
    returns :class:`BlockResults` (blocks with ``n <= k`` get all their eigenvalues, densely).

    Example:
        >>> import torch, curvkit as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 50, generator=g, dtype=torch.float64)
        >>> A = X.T @ X / 100                      # a matrix, or any operator such as ck.hessian(...)
        >>> r = ck.eigenvalues(A, k=3, tol=1e-8)
        >>> r.converged, r.vectors.shape
        (True, torch.Size([50, 3]))
        >>> torch.allclose(r.values, torch.linalg.eigvalsh(A).flip(0)[:3])
        True
        >>> bool((r.residuals <= 1e-8 * r.values.abs().max()).all())   # ||A v - lambda v||
        True
    """
    if which not in _WHICH:
        raise ArgumentError(f"which must be one of {_WHICH}, got {which!r}")
    if by is not None:
        out = {}
        for name, B in operator_blocks(A, by).items():
            nb = check_square(B)
            out[name] = _eigenvalues(B, min(k, nb), which, tol, max_matvecs, seed, block_size,
                                     basis_size, progress, allow_all=True)
        return BlockResults(out)
    return _eigenvalues(A, k, which, tol, max_matvecs, seed, block_size, basis_size, progress)


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, best (most wanted) first."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _eigenvalues(A, k, which, tol, max_matvecs, seed, block_size, basis_size, progress, allow_all=False):
    n = check_symmetric(A, "eigenvalues (Lanczos)")
    if not isinstance(k, int) or k < 1 or k > n or (k == n and not allow_all):
        raise ShapeError(
            f"k must be an integer with 1 <= k < n = {n}, got {k!r}; for all eigenvalues of a small "
            "operator use torch.linalg.eigvalsh(A.dense())"
        )
    if tol <= 0:
        raise ArgumentError(f"tol must be positive, got {tol}")
    b = block_size or 1
    m_max = basis_size or max(2 * k + 2 * b, 20 + 10 * b)
    if b < 1 or m_max < k + b:
        raise ArgumentError(f"need block_size >= 1 and basis_size >= k + block_size, got {b}, {m_max}")
    m_max -= (m_max - k) % b  # kept vectors + whole blocks fill the basis exactly
    budget = max_matvecs if max_matvecs is not None else max(1000, 50 * m_max)
    if m_max + b >= n:
        return _dense(A, n, k, which)
    first = b * math.ceil(k / b)
    if budget < first:
        raise ArgumentError(f"max_matvecs={budget} is below the {first} products needed for a first set of k={k} Ritz vectors")

    dt, dev = A.dtype, A.device
    eps = torch.finfo(dt).eps
    gen = generator(seed)
    V = torch.empty(n, m_max + b, dtype=dt, device=dev)
    H = torch.zeros(m_max, m_max, dtype=_F64)
    V[:, :b] = torch.linalg.qr(gaussian(n, b, gen, dt, dev))[0]
    filled = False
    m, matvecs, steps = 0, 0, 0  # V[:, :m] multiplied; V[:, m:m+b] the pending block
    # Never stop on a basis smaller than this (as ARPACK, which fills its basis first): a small
    # Krylov space can hold converged Ritz pairs yet miss a wanted eigenvalue entirely.
    m_min = min(m_max, max(2 * k, 20) + 10)
    p = min(m_max - b, k + (m_max - k) // 2)  # Ritz vectors kept at a restart
    p -= (p - k) % b if p > k else 0
    bar = progress_bar(total=budget, desc="eigenvalues", enabled=progress)
    try:
        while True:
            W = apply(A, V[:, m : m + b], "Lanczos product")
            matvecs, steps = matvecs + b, steps + 1
            bar.update(b)
            cur = m + b
            Vc = V[:, :cur]
            C = Vc.T @ W  # full reorthogonalization, twice ("twice is enough")
            W -= Vc @ C
            C2 = Vc.T @ W
            W -= Vc @ C2
            C = (C + C2).to(device="cpu", dtype=_F64)
            H[:cur, m:cur] = C
            H[m:cur, :cur] = C.T
            m = cur
            theta, S = torch.linalg.eigh((H[:m, :m] + H[:m, :m].T) / 2)
            anorm = float(theta.abs().max())
            Qn, B = _next_block(W, Vc, gen, 100 * eps * max(anorm, 1e-300))
            res = (B @ S[m - b : m]).norm(dim=0)  # ||A V s - theta V s|| = ||R s_last||
            order = _order(theta, which)
            want = order[:k] if m >= k else order
            scale = float(theta[want].abs().max())
            rel = float(res[want].max()) / max(scale, 1e-300)
            bar.set_postfix(rel_residual=f"{rel:.1e}", refresh=False)
            filled = filled or m >= m_min
            if filled and rel <= tol:
                break
            if matvecs + b > budget:
                break
            if m + b > m_max:  # thick restart: keep the best p Ritz vectors, then Qn
                keep = order[:p]
                V[:, :p] = V[:, :m] @ S[:, keep].to(device=dev, dtype=dt)
                H.zero_()
                H[:p, :p] = torch.diag(theta[keep])
                m = p
            V[:, m : m + b] = Qn
    finally:
        bar.close()

    converged = rel <= tol
    if not converged:
        warnings.warn(
            f"eigenvalues did not converge in {matvecs} products (max relative residual {rel:.2e} > "
            f"tol {tol:g}); raise max_matvecs or tol. The values returned are the current Ritz values",
            ConvergenceWarning,
            stacklevel=3,
        )
    vectors = V[:, :m] @ S[:, want].to(device=dev, dtype=dt)
    return EigenResult(
        values=theta[want].to(device=dev, dtype=dt), vectors=vectors,
        residuals=res[want].to(device=dev, dtype=dt), matvecs=matvecs, converged=converged, iterations=steps,
    )


def _next_block(W: Tensor, V: Tensor, gen: torch.Generator, small: float) -> tuple[Tensor, Tensor]:
    """Orthonormal ``Qn`` and ``B`` (float64, b x b) with ``W = Qn B``, ``Qn`` orthogonal to ``V``.

    Directions where ``W`` is (numerically) rank deficient — an invariant subspace was found —
    are replaced by random ones orthogonal to ``V`` so the Krylov space can still grow; their
    rows of ``B`` are zero, as the residual has no component there.
    """
    Qw, R = torch.linalg.qr(W)
    U, s, Vh = torch.linalg.svd(R.to(device="cpu", dtype=_F64))
    B = torch.diag(s) @ Vh
    Qn = Qw @ U.to(device=W.device, dtype=W.dtype)
    bad = s <= small
    if bad.any():
        Qn[:, bad] = gaussian(W.shape[0], int(bad.sum()), gen, W.dtype, W.device)
        B[bad] = 0
    for _ in range(2):  # small singular values amplify rounding: orthogonalize against V again
        Qn -= V @ (V.T @ Qn)
    Qn, R2 = torch.linalg.qr(Qn)
    return Qn, R2.to(device="cpu", dtype=_F64) @ B


def _dense(A: Any, n: int, k: int, which: str) -> EigenResult:
    """Small operators: form the matrix with n products and solve it exactly."""
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    D = torch.cat([apply(A, eye[:, i : i + 64], "product") for i in range(0, n, 64)], dim=1)
    D = (D + D.T) / 2
    theta, S = torch.linalg.eigh(D.to(_F64))
    want = _order(theta, which)[:k]
    vals, vecs = theta[want], S[:, want]
    res = (D.to(_F64) @ vecs - vecs * vals).norm(dim=0)
    return EigenResult(
        values=vals.to(A.dtype), vectors=vecs.to(A.dtype), residuals=res.to(A.dtype),
        matvecs=n, converged=True, iterations=1,
    )
