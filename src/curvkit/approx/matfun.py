"""Matrix functions on small symmetric factors: the one implementation every Kronecker consumer
uses (K-FAC's damped inverses, Shampoo's inverse roots, SOAP's eigenbases, Muon's
orthogonalisation).

All take a square matrix or a batch of them (``(..., n, n)``) and work in float32 or float64
whatever the input's dtype (bf16 factors are promoted; float64 stays float64), returning that
working dtype; callers cast back where they store.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import ArgumentError, CurvkitError, FallbackWarning, NonFiniteError


def work_dtype(A: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is promoted to float32."""
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _check_square(A: Tensor, name: str) -> None:
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ArgumentError(f"{name} needs a square matrix (or a batch of them, (..., n, n)), got {shape}")


def sym_eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the symmetric part of ``A`` in the working dtype, eigenvalues
    ascending. Raises NonFiniteError on NaN/inf entries instead of letting LAPACK fail with an
    opaque message.

    When LAPACK does not converge (float32 factors of low rank, e.g. a conv layer's 288 x 288
    factor from a batch of 8: "the input matrix is ill-conditioned or has too many repeated
    eigenvalues"), it retries in float64, then in float64 with ``c I`` added, ``c`` from
    ``1e-12`` up to ``1e-4`` times ``||A||_F`` (the eigenvectors are those of ``A``; the
    eigenvalues come back shifted by ``c``, a damping far below any the optimizers add). Either
    fallback warns once with a :class:`~curvkit.errors.FallbackWarning` saying what it did; a
    CurvkitError that says what to do is the last resort. Cost: one ``eigh`` (O(n^3)); a
    fallback one to six more, in float64.
    """
    _check_square(A, "sym_eigh")
    A = A.to(work_dtype(A))
    A = 0.5 * (A + A.transpose(-1, -2))
    if not bool(torch.isfinite(A).all()):
        raise NonFiniteError("a curvature factor has NaN/inf entries; no eigen-decomposition taken")
    try:
        return torch.linalg.eigh(A)
    except torch.linalg.LinAlgError:
        return _eigh_fallback(A)


_DAMPINGS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)  # relative to ||A||_F, tried in turn


def _eigh_fallback(A: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a matrix LAPACK refused in ``A.dtype``: float64, then float64 with damping."""
    dt, A64 = A.dtype, A.to(torch.float64)
    if dt != torch.float64:
        try:
            w, Q = torch.linalg.eigh(A64)
        except torch.linalg.LinAlgError:
            pass
        else:
            # one message text from one line: Python's default filter shows it once
            warnings.warn(FallbackWarning(
                "linalg.eigh did not converge on a float32 curvature factor (low rank or ill-conditioned); "
                "it was decomposed in float64 instead. Results are as asked, the step is slower; a larger "
                "batch or damping makes such factors better conditioned"), stacklevel=3)
            return w.to(dt), Q.to(dt)
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    norm = torch.linalg.matrix_norm(A64, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    for rel in _DAMPINGS:
        try:
            w, Q = torch.linalg.eigh(A64 + (rel * norm) * eye)
        except torch.linalg.LinAlgError:
            continue
        warnings.warn(FallbackWarning(
            "linalg.eigh did not converge on a curvature factor even in float64; it decomposed the factor "
            "plus a small multiple (1e-12 to 1e-4) of ||A||_F times the identity instead: the same "
            "eigenvectors, eigenvalues shifted by that damping"), stacklevel=3)
        return w.to(dt), Q.to(dt)
    raise CurvkitError(
        f"linalg.eigh did not converge on a {tuple(A.shape[-2:])} curvature factor, not in float64 and not "
        f"with damping up to {_DAMPINGS[-1]:g} ||A||_F: the factor is degenerate beyond repair. Raise the "
        "optimizer's damping (K-FAC: damping, Shampoo: epsilon), use Shampoo's root_method='newton' (no "
        "LAPACK call), or check the gradients for huge or denormal values"
    )


def inverse_root(A: Tensor, p: float, eps: float = 0.0, method: str = "eigh", iters: int = 100,
                 tol: float | None = None) -> Tensor:
    r"""``(A + eps I)^(-1/p)`` for a symmetric positive semi-definite ``A`` (``p = 1`` is the
    damped inverse, ``p = 2`` the inverse square root, ``p = 4`` Shampoo's root for 2-D weights).

    ``method="eigh"``: eigenvalues clamped at 0 (round-off makes PSD factors slightly indefinite),
    then ``eps`` added. Cost: one ``eigh``.
    ``method="newton"``: the coupled Newton iteration (Guo & Higham 2006, as in Distributed
    Shampoo): ``X <- X T``, ``M <- T^p M`` with ``T = ((p+1) I - M) / p``, started from
    ``X = z^(1/p) I``, ``M = z (A + eps I)``, ``z = (1+p) / (2 ||A + eps I||_F)`` so that the
    iteration converges for any SPD input. Cost: about ``p + 2`` matrix products per iteration,
    until ``max|M - I| <= tol`` or ``iters`` (the convergence test reads one number back per
    iteration); no LAPACK call. The damping is ``max(eps, n * eps_machine * ||A||_F)``, so that a
    positive semi-definite factor whose zero eigenvalues round-off made slightly negative still
    converges.
    """
    _check_square(A, "inverse_root")
    if not (isinstance(p, (int, float)) and p > 0):
        raise ArgumentError(f"p must be a positive number (the root), got {p!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ArgumentError(f"eps must be a number >= 0, got {eps!r}")
    dt = work_dtype(A)
    n = A.shape[-1]
    eye = torch.eye(n, dtype=dt, device=A.device)
    if method == "eigh":
        w, Q = sym_eigh(A)
        w = (w.clamp_min(0) + eps).pow(-1.0 / p)
        return (Q * w.unsqueeze(-2)) @ Q.transpose(-1, -2)
    if method != "newton":
        raise ArgumentError(f"method must be 'eigh' or 'newton', got {method!r}")
    if int(p) != p:
        raise ArgumentError(f"method='newton' needs an integer root p, got {p!r}; use method='eigh'")
    A = A.to(dt)
    A = 0.5 * (A + A.transpose(-1, -2))
    # round-off leaves a PSD factor's zero eigenvalues near -eps_mach * ||A||: a floor of
    # n * eps_mach * ||A||_F makes it positive definite, which the iteration needs
    floor = n * torch.finfo(dt).eps * torch.linalg.matrix_norm(A)[..., None, None]
    A = A + torch.clamp(floor, min=eps) * eye
    if tol is None:
        tol = 1e-10 if dt == torch.float64 else 1e-5
    norm = torch.linalg.matrix_norm(A).clamp_min(torch.finfo(dt).tiny)[..., None, None]
    z = (1 + p) / (2 * norm)
    X = z.pow(1.0 / p) * eye.expand_as(A)
    M = z * A
    for _ in range(iters):
        T = ((p + 1) * eye - M) / p
        X = X @ T
        M = torch.linalg.matrix_power(T, int(p)) @ M
        if float((M - eye).abs().amax()) <= tol:
            break
    return X


# Keller Jordan's quintic coefficients: they push singular values into [0.7, 1.2] in 5 steps
# rather than to exactly 1, which is what Muon needs and is cheaper than a converged polar factor.
_NS5 = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> Tensor:
    r"""Approximate orthogonalisation ``U V^T`` of ``G = U S V^T`` (Muon's update direction).

    ``G`` is ``(..., m, n)``; it is scaled by its Frobenius norm, transposed so that the smaller
    side is the Gram matrix's, and iterated ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and
    the quintic coefficients of Muon, each step as three batched (fused multiply-add) products.
    Runs in ``dtype`` (default bfloat16 on CUDA, as Muon does,
    float32 elsewhere); returns that dtype. Cost: 3 matrix products per step,
    about ``steps * (4 m^2 n + 2 m^3)`` flops for ``m <= n``.
    """
    if not isinstance(G, Tensor) or G.dim() < 2:
        raise ArgumentError(f"newton_schulz needs a matrix (or a batch, (..., m, n)), got "
                            f"{tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else (torch.float64 if G.dtype == torch.float64 else torch.float32)
    a, b, c = _NS5
    X = G.to(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.transpose(-1, -2)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # one (b, m, n) batch: fused multiply-adds below
    for _ in range(steps):  # 3 fused kernels per step (b A + c A^2 and a X + B X are one each)
        A = torch.bmm(X, X.transpose(-1, -2))
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(*batch, *X.shape[-2:])
    return X.transpose(-1, -2) if tall else X
