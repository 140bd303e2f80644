"""Hutchinson and STDE Laplacians: unbiased, within 4 of their own standard error (fixed seeds)."""

import pytest
import torch
from torch import nn

import curvkit as ck

from .conftest import hessians, laplacians

D = torch.float64


def net(d, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 1)).to(D)


@pytest.mark.parametrize("method,distribution", [("hutchinson", "rademacher"), ("hutchinson", "gaussian"),
                                                 ("stde", "rademacher")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_laplacians_are_within_four_of_their_stderr(method, distribution, seed):
    f = net(12)
    x = torch.randn(6, 12, dtype=D)
    exact = laplacians(f, x)
    r = ck.laplacian(f, x, method=method, probes=8, seed=seed, distribution=distribution)
    assert r.method == method and r.directions == 8 and r.gradient is None
    assert (r.stderr > 0).all()
    assert ((r.value - exact).abs() < 4 * r.stderr).all()
    torch.testing.assert_close(r.output, f(x)[:, 0], atol=1e-12, rtol=0)


def test_stderr_is_honest_over_many_seeds():
    """Standardized errors over 50 seeds have mean ~0 and spread ~1 (unbiased, honest stderr).
    With 10 probes the standardized error is Student-t with 9 dof (spread 1.13); the bounds
    are those of 50 draws (mean within 0.5, std within 0.7 ... 1.6), loose enough not to flake."""
    f = net(20, seed=3)
    x = torch.randn(2, 20, dtype=D)
    exact = laplacians(f, x)
    for method in ("hutchinson", "stde"):
        z = torch.stack([(lambda r: (r.value - exact) / r.stderr)(ck.laplacian(f, x, method=method, probes=10, seed=s))
                         for s in range(50)])
        assert z.mean().abs() < 0.5 and 0.7 < z.std() < 1.6, (method, z.mean(), z.std())


def test_stde_with_every_dimension_is_exact():
    f = net(5)
    x = torch.randn(3, 5, dtype=D)
    r = ck.laplacian(f, x, method="stde", probes=5, seed=0)
    torch.testing.assert_close(r.value, laplacians(f, x), atol=1e-10, rtol=0)
    assert torch.equal(r.stderr, torch.zeros(3, dtype=D))


def test_seeds_reproduce_and_none_draws_fresh():
    f = net(8)
    x = torch.randn(3, 8, dtype=D)
    a, b = (ck.laplacian(f, x, method="hutchinson", probes=4, seed=7) for _ in range(2))
    assert torch.equal(a.value, b.value)
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(ck.laplacian(f, x, method="hutchinson", probes=4, seed=g).value, a.value)
    c, e = (ck.laplacian(f, x, method="hutchinson", probes=4, seed=None) for _ in range(2))
    assert not torch.equal(c.value, e.value)  # 32 fresh random signs each: equal with probability 2^-32


def test_one_probe_has_no_error_bar_and_estimates_are_differentiable():
    f = net(4)
    x = torch.randn(3, 4, dtype=D)
    r = ck.laplacian(f, x, method="stde", probes=1, seed=0)
    assert torch.isnan(r.stderr).all()
    r.value.pow(2).mean().backward()
    assert all(p.grad is not None for p in list(f.parameters())[:-1])


@pytest.mark.parametrize("method,distribution", [("hutchinson", "rademacher"), ("hutchinson", "gaussian"),
                                                 ("stde", "rademacher")])
def test_squared_stderr_estimates_the_exact_variance_of_the_estimate(method, distribution):
    """E[stderr^2] equals the estimator's exact variance, known from the dense Hessian H:
    2 (||H||_F^2 - sum_i H_ii^2) / K (Rademacher), 2 ||H||_F^2 / K (Gaussian), and for STDE (d
    dimensions drawn without replacement) (1 - K/d) S^2 / K with S^2 the variance (d - 1
    denominator) of d H_ii. The mean of stderr^2 over seeds is bounded by 4 of its own standard
    error (~10-25% of the variance here): a missing finite-population factor (2x), a wrong
    sqrt(K), or a stderr 20% off fails (the z-score test above only catches gross errors)."""
    d, S = 10, 300
    K = 5 if method == "stde" else 8
    f = net(d, seed=4)
    x = torch.randn(2, d, dtype=D)
    H = hessians(f, x)
    diag = H.diagonal(dim1=-2, dim2=-1)
    if method == "stde":
        exact = (1 - K / d) * (d * diag).var(-1, correction=1) / K
    elif distribution == "gaussian":
        exact = 2 * (H * H).sum((1, 2)) / K
    else:
        exact = 2 * ((H * H).sum((1, 2)) - (diag * diag).sum(-1)) / K
    se2 = torch.stack([ck.laplacian(f, x, method=method, probes=K, seed=s, distribution=distribution,
                                    create_graph=False).stderr ** 2 for s in range(S)])
    assert ((se2.mean(0) - exact).abs() < 4 * se2.std(0) / S ** 0.5).all(), (se2.mean(0), exact)
