"""Power iteration for the eigenvalue of largest magnitude."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import ArgumentError, ConvergenceWarning
from ._util import apply, check_symmetric, gaussian, generator, retaining, work_dtype
from .results import EigenResult


def power_iteration(
    A: Any,
    max_matvecs: int = 100,
    tol: float = 1e-4,
    seed: int | torch.Generator | None = 0,
) -> EigenResult:
    """Dominant eigenpair (largest |lambda|) of a symmetric operator by power iteration.

    Stops when the residual ``||A v - lambda v||`` falls below ``tol * |lambda|`` (a direct
    residual: the last product's); a budget that runs out returns ``converged=False`` with a
    :class:`~curvkit.errors.ConvergenceWarning`. Works in float32 (float64 for float64
    operators) on any operator dtype.
    Cost: one operator product per iteration, at most ``max_matvecs``. Convergence is linear
    with rate |lambda_2 / lambda_1|; :func:`curvkit.eigenvalues` (Lanczos) needs far fewer
    products and finds several eigenvalues.

    Example:
        >>> import torch, curvkit as ck
        >>> A = torch.diag(torch.tensor([10.0, 5.0, 1.0, -2.0], dtype=torch.float64))
        >>> r = ck.power_iteration(A, max_matvecs=200, tol=1e-10)
        >>> r.converged, round(float(r.values[0]), 8)   # rate 5/10: about 30 products
        (True, 10.0)
    """
    n = check_symmetric(A, "power_iteration")
    if not isinstance(max_matvecs, int) or isinstance(max_matvecs, bool) or max_matvecs < 1:
        raise ArgumentError(f"max_matvecs must be a positive integer (a product budget), got {max_matvecs!r}")
    if not tol > 0:
        raise ArgumentError(f"tol must be positive (a relative residual), got {tol!r}")
    gen = generator(seed)
    v = gaussian(n, 1, gen, work_dtype(A.dtype), A.device)[:, 0]
    v = v / v.norm()
    with retaining(A):  # the products may share work (the Hessian's gradient graphs)
        Av, matvecs = apply(A, v), 1
        while True:
            lam = torch.dot(v, Av)
            res = (Av - lam * v).norm()
            if res <= tol * lam.abs() or matvecs >= max_matvecs:
                break
            v = Av / Av.norm()
            Av = apply(A, v)
            matvecs += 1
    converged = bool(res <= tol * lam.abs())
    if not converged:
        warnings.warn(
            f"power iteration did not converge in {max_matvecs} products (relative residual "
            f"{float(res / lam.abs()):.2e} > tol {tol:g}); raise max_matvecs or use ck.eigenvalues",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        values=lam.reshape(1), vectors=v.reshape(-1, 1), residuals=res.reshape(1),
        matvecs=matvecs, converged=converged, iterations=matvecs,
    )
