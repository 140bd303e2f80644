"""Lanczos that stops when it has converged: cost where the spectrum needs it, warm starts, and
honest residuals on half-precision products."""

import pytest
import torch

from curvkit.errors import ShapeError
from curvkit.linalg import eigenvalues, power_iteration
from curvkit.linear_operator import FunctionOperator

from ._spectra import spectrum, sym


def _separated(n=300):
    """A top eigenvalue far above the rest (the sharpness of a trained network: 175 vs 54)."""
    lam = torch.cat([torch.tensor([175.0, 54.0, 40.0], dtype=torch.float64),
                     torch.linspace(-5, 20, n - 3, dtype=torch.float64)])
    return sym(lam)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_separated_top1_costs_no_more_than_power_iteration(tol):
    A = _separated()
    lan = eigenvalues(A, k=1, tol=tol)
    pw = power_iteration(A, tol=tol, max_matvecs=2000)
    assert lan.converged and pw.converged
    assert abs(float(lan.values[0]) - 175.0) <= tol * 175
    assert lan.matvecs <= pw.matvecs, (lan.matvecs, pw.matvecs)
    assert lan.matvecs < 30  # no fixed floor of a filled basis


def test_clusters_still_cost_a_filled_basis_and_come_out_right():
    A = sym(spectrum("clustered"))
    r = eigenvalues(A, k=5, tol=1e-3)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert r.converged and r.matvecs >= 30
    assert torch.allclose(r.values, ref, atol=1e-3 * 10)


def test_warm_start_from_a_previous_result_converges_in_a_few_products():
    A = _separated()
    first = eigenvalues(A, k=1, tol=1e-6)
    g = torch.Generator().manual_seed(5)
    E = torch.randn(A.shape, generator=g, dtype=A.dtype)
    A2 = A + 1e-3 * (E + E.T)  # the next training step: the matrix moved a little
    cold = eigenvalues(A2, k=1, tol=1e-6)
    warm = eigenvalues(A2, k=1, tol=1e-6, init=first)
    assert warm.converged and abs(float(warm.values[0] - cold.values[0])) <= 1e-6 * 175
    assert warm.matvecs <= 3 < cold.matvecs
    # a block works as a start too, and a bad one is refused
    assert eigenvalues(A2, k=1, tol=1e-6, init=first.vectors[:, 0]).converged
    with pytest.raises(ShapeError, match="init must be"):
        eigenvalues(A2, k=1, init=torch.zeros(7))


def test_half_precision_products_run_in_float32_with_honest_residuals():
    A = _separated()
    Ab = A.to(torch.bfloat16)
    op = FunctionOperator(lambda V: Ab @ V, A.shape[0], torch.bfloat16)
    r = eigenvalues(op, k=1, tol=1e-2)
    assert r.values.dtype == torch.float32 and r.vectors.dtype == torch.float32
    assert abs(float(r.values[0]) - 175.0) <= 1e-2 * 175
    # the residual is the direct one, from a product of the operator as it is (bf16)
    direct = ((Ab @ r.vectors.to(torch.bfloat16)).float() - r.vectors * r.values).norm(dim=0)
    assert torch.allclose(r.residuals, direct, rtol=1e-3)
    # asked for more than bf16 can give: not converged, and it says so
    with pytest.warns(Warning, match="did not converge"):
        tight = eigenvalues(op, k=1, tol=1e-7, max_matvecs=60)
    assert not tight.converged
    pw = power_iteration(op, tol=1e-2)
    assert pw.converged and abs(float(pw.values[0]) - 175.0) <= 1e-2 * 175


@pytest.mark.parametrize("k", [11, 15])
def test_many_eigenvalues_with_an_edge_in_a_continuum_stop_before_the_budget(k):
    """Regression: with k >= 11 the cluster guard asked for a basis larger than the basis can be,
    and an edge inside the bulk never "resolved": the run took the whole budget (1,500 products)."""
    A = sym(spectrum("clustered"))
    r = eigenvalues(A, k=k, tol=1e-3)
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    assert r.converged and r.matvecs < 200
    assert torch.allclose(r.values, ref, atol=1e-3 * 10)
