"""Extreme eigenpairs of a symmetric operator: block Lanczos with thick restarts."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ..progress import progress as progress_bar
from ..errors import ArgumentError, ConvergenceWarning, ShapeError
from ._basis import Basis
from ._util import apply, check_square, check_symmetric, gaussian, generator, operator_blocks, retaining, work_dtype
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
    init: EigenResult | Tensor | None = None,
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
    over the wanted values, so eigenvalues near 0 do not stall convergence). The Ritz pairs are
    checked after every block, so a well-separated top-1 stops as soon as it has converged (a
    handful of products, fewer than power iteration to the same tolerance). The guard against
    missing a member of a cluster costs products only where the spectrum has one: where two of
    the wanted Ritz values (or the last wanted and the next) lie within ``CLUSTER`` (2%) of
    ``max|lambda|``, the run goes on until its basis holds ``max(2k, 20) + 10`` vectors and the
    near-ties at the edge have converged too (a small Krylov space can hold converged pairs and
    still miss a cluster member whose start component is small).

    ``init``: a warm start, a previous :class:`EigenResult` or an ``(n,)`` / ``(n, c)`` block
    (e.g. the top eigenvectors at the last training step): the first block is those vectors
    (block size ``c`` unless ``block_size`` says otherwise, padded with random columns). An
    eigenvector that moved little since converges in one or two block products.

    Precision: the basis and the Ritz problem run in float32 (float64 for float64 operators),
    whatever the operator's dtype; a bf16/fp16 operator multiplies a cast of each block. Where the
    products carry rounding the Lanczos relation does not see (half precision, TF32 on CUDA) the
    returned ``residuals`` are recomputed from one direct product of the ``k`` vectors, and
    ``converged`` follows them: a reported error bar is never optimistic. Otherwise
    ``residuals`` are read off the relation ``A V = V H + R E^T`` (equal to direct ones up to
    rounding, at no cost).

    Cost: at most ``max_matvecs`` operator products (default ``max(1000, 50 * basis_size)``),
    counted as columns: one block product of ``b`` columns counts ``b``; typically a few times
    ``k`` (plus ``k`` for the direct check where it runs, rounded up to whole blocks on CUDA so
    that a CUDA-graphed operator replays its graph). Memory: the vectors the run produces, at
    most ``basis_size + block_size`` of length n in the working dtype (top-1: 30 at most, often
    under 10); they stay on the operator's device while they take under 10% of its memory (and
    half of what is free), the rest in pinned host memory, copied back a block at a time (a 700M
    model's vector is 2.8 GB: a full basis on the GPU would crowd out the products). If
    ``basis_size + block_size >= n`` the operator is small: it is formed densely with ``n`` products and solved
    exactly. A budget that runs out returns ``converged=False`` with a
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
        if init is not None:
            raise ArgumentError("init= is a start for one operator; it cannot be combined with by=")
        out = {}
        for name, B in operator_blocks(A, by).items():
            nb = check_square(B)
            with retaining(B):
                out[name] = _eigenvalues(B, min(k, nb), which, tol, max_matvecs, seed, block_size,
                                         basis_size, None, progress, allow_all=True)
        return BlockResults(out)
    with retaining(A):  # the products of one run may share work (the Hessian's gradient graphs)
        return _eigenvalues(A, k, which, tol, max_matvecs, seed, block_size, basis_size, init, progress)


CLUSTER = 0.02  # unwanted Ritz values this close (relative to max|lambda|) to the last wanted one must converge too


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, best (most wanted) first."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _inexact_products(A: Any) -> bool:
    """Whether products carry rounding the Lanczos relation cannot see: what the operator says
    (``exact_products``, e.g. a curvature operator knows whether its model has convolutions), else
    a half-precision operator, or TF32 matrix multiplies/convolutions on CUDA."""
    said = getattr(A, "exact_products", None)
    if said is not None:
        return not said
    if A.dtype in (torch.float16, torch.bfloat16):
        return True
    dev = torch.device(A.device)
    return dev.type == "cuda" and A.dtype == torch.float32 and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def _start_block(init: Any, n: int, b: int | None, gen: torch.Generator, wd: torch.dtype, dev) -> Tensor:
    """The first block: the warm start's vectors (padded with random columns to ``b``), orthonormal."""
    if init is None:
        return _orthonormal(gaussian(n, b or 1, gen, wd, dev))
    V0 = init.vectors if isinstance(init, EigenResult) else init
    if not isinstance(V0, Tensor) or V0.dim() not in (1, 2) or V0.shape[0] != n:
        raise ShapeError(f"init must be an EigenResult or a tensor of shape ({n},) or ({n}, c), got "
                         f"{tuple(V0.shape) if isinstance(V0, Tensor) else type(V0).__name__}")
    V0 = (V0[:, None] if V0.dim() == 1 else V0).detach().to(device=dev, dtype=wd)
    if not bool(torch.isfinite(V0).all()):
        raise ShapeError("init has NaN/inf entries; pass the vectors of a finished run")
    b = b or V0.shape[1]
    if V0.shape[1] < b:
        V0 = torch.cat([V0, gaussian(n, b - V0.shape[1], gen, wd, dev)], dim=1)
    return _orthonormal(V0[:, :b])


def _orthonormal(X: Tensor) -> Tensor:
    return X / X.double().norm().to(X.dtype) if X.shape[1] == 1 else torch.linalg.qr(X)[0]


def _eigenvalues(A, k, which, tol, max_matvecs, seed, block_size, basis_size, init, progress, allow_all=False):
    n = check_symmetric(A, "eigenvalues (Lanczos)")
    if not isinstance(k, int) or k < 1 or k > n or (k == n and not allow_all):
        raise ShapeError(
            f"k must be an integer with 1 <= k < n = {n}, got {k!r}; for all eigenvalues of a small "
            "operator use torch.linalg.eigvalsh(A.dense())"
        )
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ArgumentError(f"tol must be a positive number, got {tol!r}")
    wd, dev = work_dtype(A.dtype), A.device
    gen = generator(seed)
    V0 = _start_block(init, n, block_size, gen, wd, dev)
    b = V0.shape[1]
    m_max = basis_size or max(2 * k + 2 * b, 20 + 10 * b)
    if b < 1 or m_max < k + b:
        raise ArgumentError(f"need block_size >= 1 and basis_size >= k + block_size, got {b}, {m_max}")
    m_max -= (m_max - k) % b  # kept vectors + whole blocks fill the basis exactly
    budget = max_matvecs if max_matvecs is not None else max(1000, 50 * m_max)
    if m_max + b >= n:
        return _dense(A, n, k, which)
    if budget < b:
        raise ArgumentError(f"max_matvecs={budget} is below one block of {b} products")

    eps = torch.finfo(wd).eps
    V = Basis(n, wd, dev)  # only the vectors produced are allocated; on the device while they fit
    V.append(V0)
    pending = V0  # the block to multiply next (its copy is the basis' last block)
    H = torch.zeros(m_max, m_max, dtype=_F64)
    m, matvecs, steps, restarts = 0, 0, 0, 0  # basis columns multiplied so far
    p = min(m_max - b, k + (m_max - k) // 2)  # Ritz vectors kept at a restart
    p -= (p - k) % b if p > k else 0
    bar = progress_bar(total=budget, desc="eigenvalues", enabled=progress)
    try:
        while True:
            W = apply(A, pending, "Lanczos product")
            matvecs, steps = matvecs + b, steps + 1
            bar.update(b)
            cur = m + b
            C = V.orthogonalize(W)  # full reorthogonalization against every basis vector, twice
            H[:cur, m:cur] = C
            H[m:cur, :cur] = C.T
            m = cur
            theta, S = torch.linalg.eigh((H[:m, :m] + H[:m, :m].T) / 2)
            anorm = float(theta.abs().max())
            Qn, B = _next_block(W, V, gen, 100 * eps * max(anorm, 1e-300))
            del W
            res = (B @ S[m - b : m]).norm(dim=0)  # ||A V s - theta V s|| = ||R s_last||
            order = _order(theta, which)
            want = order[:k]
            scale = max(float(theta[want].abs().max()), 1e-300)
            rel = float(res[want].max()) / scale
            bar.set_postfix(rel_residual=f"{rel:.1e}", refresh=False)
            if m >= k and rel <= tol and (
                    m + b > n or _may_stop(theta, res, order, k, m, m_max, restarts, tol, scale)):
                break
            if matvecs + b > budget:
                break
            if m + b > m_max:  # thick restart: keep the best p Ritz vectors, then Qn
                keep = order[:p]
                V.restart(S[:, keep], chunk=b)
                H.zero_()
                H[:p, :p] = torch.diag(theta[keep])
                m, restarts = p, restarts + 1
            V.append(Qn)
            pending = Qn
    finally:
        bar.close()

    want = order[: min(k, m)]
    vectors = V.combine(S[:, want])
    del V, pending
    values, residuals = theta[want].to(device=dev, dtype=wd), res[want].to(device=dev, dtype=wd)
    if _inexact_products(A):  # one direct product: the relation cannot see the products' rounding
        AV, cols = _direct(A, vectors, b)
        matvecs += cols
        residuals = (AV - vectors * values).norm(dim=0)
        rel = float(residuals.max()) / scale
    converged = m >= k and rel <= tol
    if not converged:
        warnings.warn(
            f"eigenvalues did not converge in {matvecs} products (max relative residual {rel:.2e} > "
            f"tol {tol:g}); raise max_matvecs or tol. The values returned are the current Ritz values",
            ConvergenceWarning,
            stacklevel=3,
        )
    return EigenResult(values=values, vectors=vectors, residuals=residuals, matvecs=matvecs,
                       converged=converged, iterations=steps)


def _direct(A: Any, vectors: Tensor, b: int) -> tuple[Tensor, int]:
    """``A @ vectors`` and the columns it cost. On CUDA in products of the run's own block size
    ``b`` (padded with zero columns): an operator that captured a CUDA graph per block size replays
    it instead of capturing a new one (a capture costs more than the padding)."""
    k = vectors.shape[1]
    if torch.device(A.device).type != "cuda" or k == b:
        return apply(A, vectors, "residual check product"), k
    outs = []
    for j in range(0, k, b):
        block = vectors[:, j : j + b]
        if block.shape[1] < b:
            block = torch.cat([block, block.new_zeros(block.shape[0], b - block.shape[1])], dim=1)
        outs.append(apply(A, block, "residual check product")[:, : min(b, k - j)])
    return torch.cat(outs, dim=1), b * len(outs)


def _may_stop(theta: Tensor, res: Tensor, order: Tensor, k: int, m: int, m_max: int, restarts: int,
              tol: float, scale: float) -> bool:
    """The cluster guard, once the wanted pairs have converged. Where the wanted Ritz values and
    the next one are separated by gaps of at least ``CLUSTER * scale``, stop: nothing hides
    between them. Where two are closer (a cluster), a small Krylov space can hold converged pairs
    yet miss a member of the cluster entirely (its start component is small), so stop only once
    the basis holds ``max(2k, 20) + 10`` vectors (at most the whole basis, ``m_max``), as ARPACK
    fills its basis first, and the unwanted Ritz values within ``CLUSTER * scale`` of the last
    wanted one have converged too, or two thick restarts have passed (an edge inside a continuum
    of eigenvalues cannot be resolved at any cost: the wanted values are then within 2% of it)."""
    seq = theta[order[: k + 1]]
    if len(seq) < 2 or bool(((seq[1:] - seq[:-1]).abs() >= CLUSTER * scale).all()):
        return True
    edge = theta[order[k - 1]]
    near = order[k:][(theta[order[k:]] - edge).abs() <= CLUSTER * scale]
    resolved = bool((res[near] <= tol * scale).all()) or restarts >= 2
    return m >= min(max(2 * k, 20) + 10, m_max) and resolved


def _next_block(W: Tensor, V: Basis, gen: torch.Generator, small: float) -> tuple[Tensor, Tensor]:
    """Orthonormal ``Qn`` and ``B`` (float64, b x b) with ``W = Qn B``, ``Qn`` orthogonal to ``V``.

    Directions where ``W`` is (numerically) rank deficient — an invariant subspace was found —
    are replaced by random ones orthogonal to ``V`` so the Krylov space can still grow; their
    rows of ``B`` are zero, as the residual has no component there.
    """
    if W.shape[1] == 1:  # a vector: its norm (a QR of an (n, 1) matrix allocates a large workspace on CUDA)
        return _next_vector(W, V, gen, small)
    Qw, R = torch.linalg.qr(W)
    U, s, Vh = torch.linalg.svd(R.to(device="cpu", dtype=_F64))
    B = torch.diag(s) @ Vh
    Qn = Qw @ U.to(device=W.device, dtype=W.dtype)
    bad = s <= small
    if bad.any():
        Qn[:, bad] = gaussian(W.shape[0], int(bad.sum()), gen, W.dtype, W.device)
        B[bad] = 0
    V.orthogonalize(Qn)  # small singular values amplify rounding: orthogonalize against V again
    Qn, R2 = torch.linalg.qr(Qn)
    return Qn, R2.to(device="cpu", dtype=_F64) @ B


def _next_vector(w: Tensor, V: Basis, gen: torch.Generator, small: float) -> tuple[Tensor, Tensor]:
    """:func:`_next_block` for block size 1: ``w = q beta``."""
    beta = float(w.double().norm())
    if beta <= small:  # an invariant subspace: continue from a random direction, beta = 0
        q, beta = gaussian(w.shape[0], 1, gen, w.dtype, w.device), 0.0
    else:
        q = w / beta
    V.orthogonalize(q)
    r = float(q.double().norm())
    return q.div_(r), torch.tensor([[r * beta]], dtype=_F64)


def _dense(A: Any, n: int, k: int, which: str) -> EigenResult:
    """Small operators: form the matrix with n products and solve it exactly."""
    eye = torch.eye(n, dtype=work_dtype(A.dtype), device=A.device)
    D = torch.cat([apply(A, eye[:, i : i + 64], "product") for i in range(0, n, 64)], dim=1)
    D = (D + D.T) / 2
    theta, S = torch.linalg.eigh(D.to(_F64))
    want = _order(theta, which)[:k]
    vals, vecs = theta[want], S[:, want]
    res = (D.to(_F64) @ vecs - vecs * vals).norm(dim=0)
    wd = work_dtype(A.dtype)
    return EigenResult(
        values=vals.to(wd), vectors=vecs.to(wd), residuals=res.to(wd), matvecs=n, converged=True, iterations=1,
    )
