import math

import pytest
import torch

from curvkit.errors import CurvkitWarning, NonFiniteError
from curvkit.linalg import spectral_density

from ._spectra import spectrum, sym


def smoothed_cdf(lam, t, sigma):
    """The exact spectrum's CDF smoothed by the same Gaussian: what SLQ estimates."""
    return 0.5 * (1 + torch.erf((t[:, None] - lam[None]) / (sigma * math.sqrt(2)))).mean(1)


@pytest.mark.parametrize("name", ["indefinite", "lowrank", "clustered"])
def test_integrates_to_one_and_matches_cdf(name):
    n, probes = 200, 10
    lam = spectrum(name, n=n)
    r = spectral_density(sym(lam), iterations=60, probes=probes, seed=0)
    assert r.matvecs == 60 * probes
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-12)
    assert (r.density >= 0).all()
    assert torch.allclose(r.weights.sum(1), torch.ones(probes, dtype=torch.float64))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(r.density, r.grid)])
    t = torch.quantile(lam, torch.linspace(0.1, 0.9, 9, dtype=torch.float64))
    idx = torch.searchsorted(r.grid, t)
    est, exact = cdf[idx], smoothed_cdf(lam, r.grid[idx], r.sigma)
    # v^T f(A) v / v^T v for Gaussian v and 0 <= f <= 1 has variance <= 2 F (1 - F) / (n + 2);
    # 4 such standard errors of the probe mean, plus 2e-3 for the grid/quadrature discretization
    tol = 4 * torch.sqrt(2 * exact * (1 - exact) / ((n + 2) * probes)) + 2e-3
    assert ((est - exact).abs() < tol).all(), (est - exact, tol)


def test_full_krylov_nodes_are_the_eigenvalues():
    lam = torch.tensor([-3.0, -1.0, 0.5, 0.7, 2.0, 5.0], dtype=torch.float64).repeat_interleave(5)
    A = sym(lam)
    r = spectral_density(A, iterations=30, probes=3, seed=1)
    for c in range(3):  # the Krylov space holds 6 distinct eigenvalues: early stop, exact nodes
        used = r.nodes[c][r.weights[c] > 1e-10]
        assert torch.allclose(used.sort().values, lam.unique(), atol=1e-8)
    assert r.matvecs < 30 * 3  # runs stopped once their Krylov space was exhausted


def test_same_seed_user_grid_and_errors():
    A = sym(spectrum("indefinite", n=100))
    r1, r2 = spectral_density(A, 20, 4, seed=3), spectral_density(A, 20, 4, seed=3)
    assert torch.equal(r1.density, r2.density)
    with pytest.warns(CurvkitWarning, match="grid holds only"):
        spectral_density(A, 20, 4, grid=torch.linspace(0, 1, 50, dtype=torch.float64))
    with pytest.raises(ValueError):
        spectral_density(A, iterations=0)
    with pytest.raises(NonFiniteError):
        spectral_density(A * float("nan"), 5, 2)


def test_tiny_network_hessian(tiny_hessian):
    H, D = tiny_hessian
    lam = torch.linalg.eigvalsh(D)
    n, probes = H.shape[0], 8
    r = spectral_density(H, iterations=50, probes=probes, seed=0)
    assert r.matvecs == 50 * probes
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(r.density, r.grid)])
    idx = torch.searchsorted(r.grid, torch.quantile(lam, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    exact = smoothed_cdf(lam, r.grid[idx], r.sigma)
    tol = 4 * torch.sqrt(2 * exact * (1 - exact) / ((n + 2) * probes)) + 2e-3
    assert ((cdf[idx] - exact).abs() < tol).all()
    assert r.nodes.min() >= lam[0] - 1e-8 and r.nodes.max() <= lam[-1] + 1e-8  # Ritz values interlace


def test_stderr_matches_the_spread_over_seeds():
    """The reported pointwise stderr is the spread of the density across independent runs."""
    A = sym(spectrum("decaying", n=120))
    grid = torch.linspace(-0.5, 11.0, 200, dtype=torch.float64)
    runs = [spectral_density(A, iterations=30, probes=4, grid=grid, sigma=0.3, seed=s) for s in range(40)]
    spread = torch.stack([r.density for r in runs]).std(0, correction=1)
    reported = torch.stack([r.stderr for r in runs]).mean(0)
    assert runs[0].stderr.shape == grid.shape and bool((runs[0].stderr >= 0).all())
    where = spread > 0.05 * spread.max()  # compare where there is spread to compare
    ratio = float((reported[where] / spread[where]).median())
    assert 0.7 < ratio < 1.4, ratio
    assert math.isnan(float(spectral_density(A, iterations=10, probes=1, seed=0).stderr[0]))
