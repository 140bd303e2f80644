"""ck.spectral_density against known spectra. The density is normalised by its own mass over the
grid, so these tests check the UNNORMALISED quantities: each probe's quadrature weights, the
smoothed quadrature's mass over the grid, and the CDF, against what the spectrum implies."""

import math
import re

import pytest
import torch

from curvkit.errors import ArgumentError, CurvkitWarning, NonFiniteError
from curvkit.linalg import spectral_density

from ._spectra import spectrum, sym

F64 = torch.float64


def smoothed_cdf(lam, t, sigma):
    """The exact spectrum's CDF smoothed by the same Gaussian: what SLQ estimates."""
    return 0.5 * (1 + torch.erf((t[:, None] - lam[None]) / (sigma * math.sqrt(2)))).mean(1)


def smoothed_quadrature(r, t):
    """``mean_probes sum_j w_j N(t; theta_j, sigma)`` at points t, from the result's own nodes and
    weights: the density before normalisation."""
    k = torch.exp(-0.5 * ((t[:, None, None] - r.nodes[None]) / r.sigma) ** 2) / (r.sigma * math.sqrt(2 * math.pi))
    return (k * r.weights[None]).sum(-1).mean(1)


def kernel_mass(r, a, b):
    """The smoothed quadrature's exact mass on [a, b] (before any normalisation)."""
    Phi = lambda t: 0.5 * (1 + torch.erf((t - r.nodes) / (r.sigma * math.sqrt(2))))  # noqa: E731
    return float(((Phi(b) - Phi(a)) * r.weights).sum(1).mean())


def cdf_tolerance(exact, n, probes):
    # v^T f(A) v / v^T v for Gaussian v and 0 <= f <= 1 has variance <= 2 F (1 - F) / (n + 2);
    # 4 such standard errors of the probe mean, plus 2e-3 for the grid/quadrature discretization
    return 4 * torch.sqrt(2 * exact * (1 - exact) / ((n + 2) * probes)) + 2e-3


@pytest.mark.parametrize("name", ["indefinite", "lowrank", "clustered"])
def test_unnormalised_mass_and_cdf_match_the_spectrum(name):
    n, probes = 200, 10
    lam = spectrum(name, n=n)
    r = spectral_density(sym(lam), iterations=60, probes=probes, seed=0)
    assert r.matvecs == 60 * probes
    # each probe's quadrature has the mass of its unit start vector
    assert torch.allclose(r.weights.sum(1), torch.ones(probes, dtype=F64), atol=1e-12)
    assert (r.weights >= 0).all()
    # the Ritz values interlace: the nodes lie in the spectrum's range, and the default grid spans
    # that range plus 5 sigma on each side, so it holds all but 2 Phi(-5) < 6e-7 of the kernel mass
    assert lam.min() - 1e-8 <= r.nodes.min() and r.nodes.max() <= lam.max() + 1e-8
    assert float(r.grid[0]) == pytest.approx(float(r.nodes.min()) - 5 * r.sigma, abs=1e-12)
    assert float(r.grid[-1]) == pytest.approx(float(r.nodes.max()) + 5 * r.sigma, abs=1e-12)
    mass = kernel_mass(r, r.grid[0], r.grid[-1])
    assert 1 - 6e-7 <= mass <= 1 + 1e-12
    # so the density is the smoothed quadrature itself: normalising it changed nothing visible
    raw = smoothed_quadrature(r, r.grid)
    assert float((r.density - raw).abs().max()) <= 1e-5 * float(raw.max())
    assert (r.density >= 0).all()
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(r.density, r.grid)])
    t = torch.quantile(lam, torch.linspace(0.1, 0.9, 9, dtype=F64))
    idx = torch.searchsorted(r.grid, t)
    est, exact = cdf[idx], smoothed_cdf(lam, r.grid[idx], r.sigma)
    assert ((est - exact).abs() < cdf_tolerance(exact, n, probes)).all(), est - exact


def test_a_grid_over_part_of_the_spectrum_holds_that_part_of_the_mass():
    n, probes = 200, 10
    lam = spectrum("indefinite", n=n)
    A = sym(lam)
    a, b = float(lam.min()) - 1.0, float(torch.quantile(lam, 0.4))
    grid = torch.linspace(a, b, 800, dtype=F64)
    with pytest.warns(CurvkitWarning, match="grid holds only") as caught:
        r = spectral_density(A, iterations=60, probes=probes, grid=grid, sigma=0.2, seed=2)
    mass = kernel_mass(r, grid[0], grid[-1])
    exact = float(smoothed_cdf(lam, torch.tensor([b], dtype=F64), 0.2)[0] - smoothed_cdf(lam, torch.tensor([a], dtype=F64), 0.2)[0])
    assert 0.3 < exact < 0.5
    assert abs(mass - exact) < float(cdf_tolerance(torch.tensor(exact, dtype=F64), n, probes))
    reported = float(re.search(r"holds only ([\d.]+)%", str(caught[0].message)).group(1)) / 100
    assert reported == pytest.approx(mass, abs=2e-3)  # the trapezoid mass the message states
    # the density returned is that grid's share, renormalised: the smoothed quadrature / its mass
    raw = smoothed_quadrature(r, grid)
    assert torch.allclose(r.density * float(torch.trapezoid(raw, grid)), raw, rtol=1e-10, atol=0)


def test_full_krylov_nodes_are_the_eigenvalues_and_weights_their_share():
    distinct = torch.tensor([-3.0, -1.0, 0.5, 0.7, 2.0, 5.0], dtype=F64)
    lam = distinct.repeat_interleave(5)
    A = sym(lam)
    probes = 40
    r = spectral_density(A, iterations=30, probes=probes, seed=1)
    assert r.matvecs < 30 * probes  # runs stopped once their Krylov space was exhausted
    share = torch.zeros(probes, 6, dtype=F64)
    for c in range(probes):  # the Krylov space holds 6 distinct eigenvalues: early stop, exact nodes
        used = r.weights[c] > 1e-10
        assert torch.allclose(r.nodes[c][used].sort().values, distinct, atol=1e-8)
        assert float(r.weights[c].sum()) == pytest.approx(1.0, abs=1e-12)  # slots after the stop weigh 0
        for j, value in enumerate(distinct):
            share[c, j] = r.weights[c][(r.nodes[c] - value).abs() < 1e-6].sum()
    # a node's weight is the start vector's share in its eigenspace: 5 of 30 dimensions each
    mean, stderr = share.mean(0), share.std(0) / probes**0.5
    assert ((mean - 1 / 6).abs() < 4 * stderr).all(), (mean, stderr)


def test_same_seed_and_errors():
    A = sym(spectrum("indefinite", n=100))
    r1, r2 = spectral_density(A, 20, 4, seed=3), spectral_density(A, 20, 4, seed=3)
    assert torch.equal(r1.density, r2.density)
    with pytest.raises(ArgumentError, match="iterations and probes"):
        spectral_density(A, iterations=0)
    with pytest.raises(ArgumentError, match="sigma"):
        spectral_density(A, 5, 2, sigma=0.0)
    with pytest.raises(ArgumentError, match="grid"):
        spectral_density(A, 5, 2, grid=1)
    with pytest.raises(ArgumentError, match="none of the spectral mass"), pytest.warns(CurvkitWarning):
        spectral_density(A, 5, 2, grid=torch.linspace(1e3, 1e3 + 1, 20, dtype=F64))
    with pytest.raises(NonFiniteError):
        spectral_density(A * float("nan"), 5, 2)


def test_tiny_network_hessian(tiny_hessian):
    H, D = tiny_hessian
    lam = torch.linalg.eigvalsh(D)
    n, probes = H.shape[0], 8
    r = spectral_density(H, iterations=50, probes=probes, seed=0)
    assert r.matvecs == 50 * probes
    assert torch.allclose(r.weights.sum(1), torch.ones(probes, dtype=F64), atol=1e-12)
    assert r.nodes.min() >= lam[0] - 1e-8 and r.nodes.max() <= lam[-1] + 1e-8  # Ritz values interlace
    assert 1 - 6e-7 <= kernel_mass(r, r.grid[0], r.grid[-1]) <= 1 + 1e-12
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(r.density, r.grid)])
    idx = torch.searchsorted(r.grid, torch.quantile(lam, torch.tensor([0.25, 0.5, 0.75], dtype=F64)))
    exact = smoothed_cdf(lam, r.grid[idx], r.sigma)
    assert ((cdf[idx] - exact).abs() < cdf_tolerance(exact, n, probes)).all()


def test_stderr_matches_the_spread_over_seeds():
    """The reported pointwise stderr is the spread of the density across independent runs."""
    A = sym(spectrum("decaying", n=120))
    grid = torch.linspace(-1.5, 2.5, 200, dtype=F64)  # the spectrum (0, 1] plus 5 sigma each side
    runs = [spectral_density(A, iterations=30, probes=4, grid=grid, sigma=0.3, seed=s) for s in range(40)]
    spread = torch.stack([r.density for r in runs]).std(0, correction=1)
    reported = torch.stack([r.stderr for r in runs]).mean(0)
    assert runs[0].stderr.shape == grid.shape and bool((runs[0].stderr >= 0).all())
    where = spread > 0.05 * spread.max()  # compare where there is spread to compare
    ratio = float((reported[where] / spread[where]).median())
    assert 0.7 < ratio < 1.4, ratio
    assert math.isnan(float(spectral_density(A, iterations=10, probes=1, seed=0).stderr[0]))
