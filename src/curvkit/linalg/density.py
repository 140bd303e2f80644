"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ..progress import progress as progress_bar
from ..errors import ArgumentError, CurvkitWarning
from ._util import apply, check_symmetric, gaussian, generator, retaining, work_dtype
from .results import DensityResult

_F64 = torch.float64


def spectral_density(
    A: Any,
    iterations: int = 80,
    probes: int = 10,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    seed: int | torch.Generator | None = 0,
    reorthogonalize: bool = True,
    progress: bool | None = None,
) -> DensityResult:
    r"""Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    For each of ``probes`` Gaussian starting vectors ``v`` (normalized), ``iterations`` Lanczos
    steps give a tridiagonal ``T = S diag(theta) S^T`` whose Gauss quadrature — nodes ``theta``,
    weights ``S[0, :]^2`` — approximates ``v^T f(A) v``, an unbiased estimate of
    ``tr f(A) / n``. Averaging over probes and smoothing each node with a Gaussian of width
    ``sigma`` gives the density (Ghorbani, Krishnan, Xiao 2019; Lin, Saad, Yang 2016).

    All probes run as independent Lanczos recurrences that share one block product per step:
    ``A @ V`` with ``V`` of shape ``(n, probes)``, so a step costs one pass for all probes.
    ``reorthogonalize`` (default) keeps each run's basis orthogonal (memory:
    ``iterations * probes * n`` numbers); without it ghost copies of converged eigenvalues appear,
    which the quadrature tolerates but the nodes show.

    ``grid``: number of points (default spanning the extreme Ritz values plus ``5 sigma``) or the
    points themselves. ``sigma`` defaults to 2% of the span of the Ritz values. ``density`` is
    normalized to integrate to 1 over the grid (trapezoid rule); a user grid that misses more
    than 1% of the mass draws a warning. A run that finds an invariant subspace stops early for
    that probe; its remaining quadrature slots get weight 0.

    Cost: ``iterations * probes`` operator products (columns), in ``iterations`` block products.

    Example:
        >>> import torch, curvkit as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 50, generator=g, dtype=torch.float64)
        >>> A = X.T @ X / 100
        >>> r = ck.spectral_density(A, iterations=30, probes=4, seed=0)
        >>> r.matvecs, r.nodes.shape                # one row of Gauss quadrature nodes per probe
        (120, torch.Size([4, 30]))
        >>> lam = torch.linalg.eigvalsh(A)         # the nodes are Ritz values: inside the spectrum
        >>> bool(lam[0] - 1e-9 <= r.nodes.min() and r.nodes.max() <= lam[-1] + 1e-9)
        True
        >>> round(float(torch.trapezoid(r.density, r.grid)), 6)
        1.0
    """
    n = check_symmetric(A, "spectral_density (Lanczos quadrature)")
    if not isinstance(iterations, int) or iterations < 1 or not isinstance(probes, int) or probes < 1:
        raise ArgumentError(f"iterations and probes must be positive integers, got {iterations!r}, {probes!r}")
    if sigma is not None and not sigma > 0:
        raise ArgumentError(f"sigma must be positive, got {sigma}")
    iterations = min(iterations, n)  # a Krylov space has at most n dimensions
    dt, dev = work_dtype(A.dtype), A.device
    gen = generator(seed)
    Q = gaussian(n, probes, gen, dt, dev)
    Q = Q / Q.norm(dim=0)
    basis = torch.empty(iterations, n, probes, dtype=dt, device=dev) if reorthogonalize else None
    alpha = torch.zeros(iterations, probes, dtype=_F64)
    beta = torch.zeros(iterations, probes, dtype=_F64)
    steps = torch.full((probes,), iterations, dtype=torch.long)  # Lanczos steps per probe
    live = torch.ones(probes, dtype=torch.bool, device=dev)
    Q_prev = torch.zeros_like(Q)
    b_prev = torch.zeros(probes, dtype=dt, device=dev)
    matvecs, anorm = 0, 0.0
    bar = progress_bar(total=iterations, desc="spectral density", enabled=progress)
    with retaining(A):  # the products of one run may share work (the Hessian's gradient graphs)
        try:
            for j in range(iterations):
                cols = live.nonzero()[:, 0]
                W = torch.zeros_like(Q)
                W[:, cols] = apply(A, Q[:, cols], "Lanczos product")
                matvecs += len(cols)
                a = (Q * W).sum(0)
                W -= Q * a + Q_prev * b_prev
                if basis is not None:
                    basis[j] = Q
                    B = basis[: j + 1]
                    for _ in range(2):  # each probe against its own basis only
                        W -= torch.einsum("jnp,jp->np", B, torch.einsum("jnp,np->jp", B, W))
                b = W.norm(dim=0)
                alpha[j] = a.to(device="cpu", dtype=_F64)
                anorm = max(anorm, float(a.abs().max()), float(b.max()))
                # an invariant subspace: beta falls to rounding level (eps^0.75 leaves room for the
                # rounding of A itself; stopping there changes the quadrature by about as much)
                died = live & (b <= torch.finfo(dt).eps ** 0.75 * max(anorm, 1e-300))
                for c in died.nonzero()[:, 0].tolist():
                    steps[c] = j + 1
                live &= ~died
                bar.update(1)
                if j == iterations - 1 or not live.any():
                    break
                b = torch.where(live, b, torch.zeros_like(b))
                beta[j] = b.to(device="cpu", dtype=_F64)
                Q_prev, b_prev = Q, b
                Q = torch.where(live, W / torch.where(live, b, torch.ones_like(b)), torch.zeros_like(W))
        finally:
            bar.close()

    nodes = torch.zeros(probes, iterations, dtype=_F64)
    weights = torch.zeros(probes, iterations, dtype=_F64)
    for c in range(probes):
        m = int(steps[c])
        T = torch.diag(alpha[:m, c]) + torch.diag(beta[: m - 1, c], 1) + torch.diag(beta[: m - 1, c], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[c, :m], weights[c, :m] = theta, S[0] ** 2
        nodes[c, m:] = theta[-1]  # unused slots: a real node with weight 0

    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    sigma = float(sigma) if sigma is not None else 0.02 * width
    user_grid = isinstance(grid, Tensor)
    if user_grid:
        t = grid.detach().to(device="cpu", dtype=_F64).reshape(-1)
    elif isinstance(grid, int) and grid >= 2:
        t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=_F64)
    else:
        raise ArgumentError(f"grid must be a number of points >= 2 or a 1-D tensor of points, got {grid!r}")
    kernel = torch.exp(-0.5 * ((t[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    per_probe = (kernel * weights[None]).sum(-1)  # (grid, probes): one smoothed quadrature each
    density = per_probe.mean(1)
    mass = float(torch.trapezoid(density, t))
    if user_grid and mass < 0.99:
        warnings.warn(
            f"the grid holds only {mass:.1%} of the spectral mass; the density was renormalized to "
            "integrate to 1 over it. Widen the grid to cover the spectrum",
            CurvkitWarning,
            stacklevel=2,
        )
    if mass <= 0:
        raise ArgumentError("the grid holds none of the spectral mass; widen it to cover the spectrum")
    # the probes are independent draws: their spread is the density's standard error
    stderr = per_probe.std(1, correction=1) / math.sqrt(probes) if probes > 1 else torch.full_like(t, math.nan)
    return DensityResult(t, density / mass, nodes, weights, matvecs, sigma, stderr / mass, dim=n)
