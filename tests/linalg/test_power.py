"""ck.power_iteration: the dominant eigenpair of a known matrix within its own residual."""

import pytest
import torch

import curvkit as ck
from curvkit.errors import ArgumentError, ConvergenceWarning
from curvkit.linear_operator import FunctionOperator

from ._spectra import sym

F64 = torch.float64


def _known(top, n=60, seed=0):
    """A symmetric matrix with the given leading eigenvalues and the rest uniform in [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    rest = 4 * torch.rand(n - len(top), generator=g, dtype=F64) - 2
    lam = torch.cat([torch.tensor(top, dtype=F64), rest])
    return sym(lam, seed), lam


@pytest.mark.parametrize("top", [[10.0, 5.0], [-10.0, 5.0]], ids=["positive", "negative"])
def test_dominant_pair_within_its_residual(top):
    A, lam = _known(top)
    r = ck.power_iteration(A, max_matvecs=300, tol=1e-9, seed=1)
    assert r.converged and r.values.shape == (1,) and r.vectors.shape == (60, 1)
    v, theta, res = r.vectors[:, 0], float(r.values[0]), float(r.residuals[0])
    assert res <= 1e-9 * abs(theta)
    assert res == pytest.approx(float((A @ v - theta * v).norm()), rel=1e-6, abs=1e-14)  # the true residual
    # a Rayleigh quotient is within its residual of an eigenvalue, and here it is the dominant one
    assert abs(theta - top[0]) <= res + 1e-12
    # the vector: sin(angle to the eigenvector) <= residual / gap to the rest of the spectrum
    w, Q = torch.linalg.eigh(A)
    q = Q[:, (w - top[0]).abs().argmin()]
    gap = float((lam[1:] - theta).abs().min())
    sin = float((1 - (q @ v) ** 2).clamp_min(0).sqrt())
    assert sin <= res / gap + 1e-7
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
    # the rate is |lambda_2 / lambda_1| = 1/2 per product: about 40 products for 1e-9, not the budget
    assert r.matvecs == r.iterations and r.matvecs < 80


def test_budget_that_runs_out_warns_and_says_so():
    A, _ = _known([10.0, 9.9])  # rate 0.99: far too slow for 10 products
    with pytest.warns(ConvergenceWarning, match="did not converge in 10 products"):
        r = ck.power_iteration(A, max_matvecs=10, tol=1e-8)
    assert not r.converged and r.matvecs == 10
    v, theta = r.vectors[:, 0], r.values[0]
    assert float(r.residuals[0]) == pytest.approx(float((A @ v - theta * v).norm()), rel=1e-6)
    assert float(r.residuals[0]) > 1e-8 * abs(float(theta))


def test_same_seed_same_result_and_the_tiny_network(tiny_hessian):
    H, D = tiny_hessian
    a, b = ck.power_iteration(H, max_matvecs=30, tol=1e-3, seed=4), ck.power_iteration(H, max_matvecs=30, tol=1e-3, seed=4)
    assert torch.equal(a.vectors, b.vectors) and a.matvecs == b.matvecs
    w = torch.linalg.eigvalsh(D)
    dominant = w[w.abs().argmax()]
    r = ck.power_iteration(H, max_matvecs=500, tol=1e-6, seed=0)
    assert r.converged and abs(float(r.values[0] - dominant)) <= float(r.residuals[0]) + 1e-12


def test_refuses_what_is_not_symmetric_and_bad_options():
    A, _ = _known([10.0, 5.0], n=20)
    N = torch.triu(A)
    with pytest.raises(ArgumentError, match="power_iteration needs a symmetric operator"):
        ck.power_iteration(N)
    with pytest.raises(ArgumentError, match="not symmetric"):
        ck.power_iteration(FunctionOperator(lambda V: N @ V, 20, F64, symmetric=False))
    B = FunctionOperator(lambda V: A @ V, 20, F64)
    C = FunctionOperator(lambda V: torch.diag(torch.arange(20, dtype=F64)) @ V, 20, F64)
    with pytest.raises(ArgumentError, match="ProductOperator is not symmetric"):
        ck.power_iteration(B @ C)
    assert ck.power_iteration(B @ B, max_matvecs=300, tol=1e-8).converged  # A^2 is symmetric
    for bad in (dict(max_matvecs=0), dict(max_matvecs=2.5), dict(tol=0.0), dict(tol=-1e-3)):
        with pytest.raises(ArgumentError, match="max_matvecs|tol"):
            ck.power_iteration(A, **bad)
