"""Conjugate gradient for ``(A + damping I) x = b`` (inverse-curvature-vector products)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..progress import progress as progress_bar
from ..errors import ArgumentError, ConvergenceWarning, ShapeError
from ..linear_operator import LinearOperator, same_device
from ._util import apply, check_symmetric, retaining, work_dtype
from .results import SolveResult


def solve(
    A: Any,
    b: Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    x0: Tensor | None = None,
    progress: bool | None = None,
) -> SolveResult:
    r"""Solve ``(A + damping I) x = b`` by conjugate gradient, for symmetric positive definite
    ``A + damping I`` (a Hessian near a minimum, a GGN or Fisher with damping > 0).

    ``b`` is ``(n,)`` or ``(n, k)``: k systems solved together, one block product per step, each
    column with its own CG scalars; columns that have converged (or failed) leave the block.
    Converged when every column's relative residual ``||b - (A + damping I) x|| / ||b||`` is
    at most ``tol``; that residual is recomputed from ``x`` (not the recurrence, which drifts)
    before stopping, and ``residual`` is its max over the columns.

    A direction with ``p^T (A + damping I) p <= 0`` means the matrix is not positive definite:
    CG cannot continue there, so that column stops with a :class:`ConvergenceWarning` and
    ``converged=False`` (raise ``damping`` above ``-lambda_min``; ck.eigenvalues(A, which=
    "smallest") tells you how far). A budget that runs out warns the same way.

    Cost: one product per column per iteration, plus one per column to verify the residual;
    at most ``max_matvecs`` (default ``k * min(10 n, 1000)``), counted as columns.

    Example:
        >>> import torch, curvkit as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 50, generator=g, dtype=torch.float64)
        >>> A, b = X.T @ X / 100, torch.ones(50, dtype=torch.float64)
        >>> r = ck.solve(A, b, damping=1e-3, tol=1e-10)
        >>> r.converged, r.residual <= 1e-10
        (True, True)
        >>> torch.allclose((A + 1e-3 * torch.eye(50, dtype=torch.float64)) @ r.x, b)
        True
    """
    n = check_symmetric(A, "solve (conjugate gradient)")
    if not isinstance(b, Tensor):
        raise ShapeError(f"b must be a torch.Tensor of shape ({n},) or ({n}, k), got {type(b).__name__}")
    if b.dim() not in (1, 2) or b.shape[0] != n:
        raise ShapeError(f"b must have shape ({n},) or ({n}, k) to match the operator, got {tuple(b.shape)}")
    wd = work_dtype(A.dtype)
    if b.dtype not in (A.dtype, wd):
        raise ShapeError(f"b has dtype {b.dtype} but the operator {A.dtype}; use b.to({A.dtype})")
    if not same_device(b.device, A.device):
        raise ShapeError(f"b is on {b.device} but the operator on {A.device}; use b.to('{A.device}')")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != b.shape or x0.dtype != b.dtype):
        raise ShapeError(f"x0 must be a tensor shaped and typed like b {tuple(b.shape)}/{b.dtype}")
    if damping < 0 or tol <= 0:
        raise ArgumentError(f"need damping >= 0 and tol > 0, got damping={damping}, tol={tol}")
    vector, out_dtype = b.dim() == 1, b.dtype
    B = (b[:, None] if vector else b).to(wd)  # iterates in float32 or better (a bf16 operator multiplies casts)
    k = B.shape[1]
    budget = max_matvecs if max_matvecs is not None else k * min(10 * n, 1000)

    def op(X: Tensor) -> Tensor:
        out = apply(A, X, "CG product")
        return out + damping * X if damping else out

    bnorm = B.norm(dim=0)
    bnorm_safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B) if x0 is None else (x0[:, None] if vector else x0).to(wd).clone()
    with retaining(A):  # the products of one run may share work (the Hessian's gradient graphs)
        matvecs, steps = 0, 0
        R = B.clone()
        if x0 is not None:
            R -= op(X)
            matvecs += k
        rel = R.norm(dim=0) / bnorm_safe
        active = rel > tol  # columns still iterating
        failed = torch.zeros_like(active)
        P, rr = R.clone(), (R * R).sum(0)
        bar = progress_bar(total=budget, desc="solve", enabled=progress)
        try:
            while active.any():
                cols = active.nonzero()[:, 0]
                if matvecs + 2 * len(cols) > budget:  # a step plus its verification must fit
                    break
                AP = op(P[:, cols])
                matvecs += len(cols)
                steps += 1
                bar.update(len(cols))
                pap = (P[:, cols] * AP).sum(0)
                bad = pap <= 0
                if bad.any():
                    c = cols[bad]
                    curv = pap[bad] / (P[:, c] * P[:, c]).sum(0)
                    warnings.warn(
                        f"solve: the matrix (A + damping I) is not positive definite: column(s) "
                        f"{c.tolist()} met a direction with p^T A p / p^T p = {curv.tolist()} (+ damping "
                        f"{damping:g}). CG stopped there; raise damping above -lambda_min",
                        ConvergenceWarning,
                        stacklevel=2,
                    )
                    failed[c] = True
                    active[c] = False
                    good = ~bad
                    cols, AP, pap = cols[good], AP[:, good], pap[good]
                    if len(cols) == 0:
                        continue
                alpha = rr[cols] / pap
                X[:, cols] += P[:, cols] * alpha
                R[:, cols] -= AP * alpha
                rr_new = (R[:, cols] * R[:, cols]).sum(0)
                done = rr_new.sqrt() / bnorm_safe[cols] <= tol
                if done.any():  # confirm with the true residual: the recurrence drifts in low precision
                    c = cols[done]
                    R[:, c] = B[:, c] - op(X[:, c])
                    matvecs += len(c)
                    rr_true = (R[:, c] * R[:, c]).sum(0)
                    rr_new[done] = rr_true
                    truly = rr_true.sqrt() / bnorm_safe[c] <= tol
                    active[c[truly]] = False
                    P[:, c[~truly]] = R[:, c[~truly]]  # restart those columns from the true residual
                    redo = torch.zeros_like(done)
                    redo[done.nonzero()[:, 0][~truly]] = True
                else:
                    redo = done
                keep = ~redo
                cols_k = cols[keep]
                P[:, cols_k] = R[:, cols_k] + P[:, cols_k] * (rr_new[keep] / rr[cols_k])
                rr[cols] = rr_new
        finally:
            bar.close()
    rel = R.norm(dim=0) / bnorm_safe
    residual = float(rel.max())
    converged = bool((rel <= tol).all()) and not bool(failed.any())
    if not converged and not failed.any():
        warnings.warn(
            f"solve did not converge in {matvecs} products (relative residual {residual:.2e} > tol "
            f"{tol:g}); raise max_matvecs or damping (which improves the conditioning)",
            ConvergenceWarning,
            stacklevel=2,
        )
    X = X.to(out_dtype)
    return SolveResult(X[:, 0] if vector else X, residual, matvecs, converged, steps)


class InverseOperator(LinearOperator):
    """``(A + damping I)^{-1}`` as an operator: each product is a :func:`solve` (CG) of its columns.

    ``last`` is the :class:`SolveResult` of the latest product (its residual, products and
    convergence). Symmetric when ``A`` is. Cost of a product with ``V (n, k)``: one CG solve of k
    columns, at most ``max_matvecs`` products of ``A`` (see :func:`solve`).
    """

    def __init__(self, A: Any, damping: float, tol: float, max_matvecs: int | None):
        check_symmetric(A, "inverse (conjugate gradient)")
        if not damping >= 0:
            raise ArgumentError(f"damping must be >= 0, got {damping}")
        self.A, self.damping, self.tol, self.max_matvecs = A, float(damping), tol, max_matvecs
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.exact_products = False  # each product carries CG's error (up to tol): check residuals directly
        self.last: SolveResult | None = None

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.A,) if isinstance(self.A, LinearOperator) else ()

    def _matmat(self, V: Tensor) -> Tensor:
        self.last = solve(self.A, V, self.damping, self.tol, self.max_matvecs)
        return self.last.x


def inverse(A: Any, damping: float = 0.0, tol: float = 1e-6, max_matvecs: int | None = None) -> InverseOperator:
    """``(A + damping I)^{-1}`` as a linear operator whose products run conjugate gradient: the
    same as :func:`solve`, in a form that composes (``K @ v``, inside other algorithms).

    Example:
        >>> import torch, curvkit as ck
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> Ainv = ck.inverse(A, damping=0.0)
        >>> Ainv @ torch.tensor([2.0, 4.0], dtype=torch.float64)
        tensor([1., 1.], dtype=torch.float64)

    Cost: nothing to build; each product is one CG solve (see :class:`InverseOperator`).
    """
    return InverseOperator(A, damping, tol, max_matvecs)
