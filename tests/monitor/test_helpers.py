"""The public helpers the monitor is built from: density counts and bulk edge, outliers, overlap,
the diagonal operator and the symmetric congruence X @ Y @ X."""

import math

import pytest
import torch

import curvkit as ck
from curvkit.errors import ArgumentError, ShapeError
from curvkit.linear_operator import DiagonalOperator, FunctionOperator

F64 = torch.float64


def spectrum(seed: int, outliers=(0.13, 0.2, 0.3, 0.5, 0.8, 1.3, 2.0, 3.2, 5.0), n: int = 2000):
    """A bulk in [-0.03, 0.07] and geometric outliers down to it: no ratio is 2 or more (the old
    rule's blind spot, as for a trained classifier's k-1 outliers)."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n, generator=g, dtype=F64) * 0.1 - 0.03
    return torch.cat([bulk, torch.tensor(outliers, dtype=F64)])


def test_count_above_is_within_its_standard_error():
    lam = spectrum(0)
    d = ck.spectral_density(torch.diag(lam), iterations=60, probes=30, seed=1)
    for t in (0.05, 0.4, 1.0, 2.5):
        exact = int((lam > t).sum())
        assert abs(d.count_above(t) - exact) < 4 * d.count_above_stderr(t) + 0.5, t


def test_bulk_edge_lies_at_the_bulk_not_at_the_outliers():
    lam = spectrum(1)
    for seed in range(3):
        e = ck.spectral_density(torch.diag(lam), iterations=60, probes=8, seed=seed).bulk_edge()
        assert 0.04 < e <= 0.07 + 1e-9  # the bulk is [-0.03, 0.07]; the smallest outlier is 0.13


def test_counts_need_the_size():
    d = ck.spectral_density(torch.diag(spectrum(0)), iterations=10, probes=2)
    bare = type(d)(d.grid, d.density, d.nodes, d.weights, d.matvecs, d.sigma, d.stderr)
    with pytest.raises(ArgumentError, match="size"):
        bare.count_above(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outliers_count_geometric_outliers_that_the_gap_rule_misses(seed):
    A = torch.diag(spectrum(seed))
    r = ck.outliers(A, k=14, seed=seed)
    assert r.count == 9 and not r.capped_at_k
    assert torch.allclose(r.values, torch.tensor([5.0, 3.2, 2.0, 1.3, 0.8, 0.5, 0.3, 0.2, 0.13], dtype=F64), atol=1e-3)
    assert ck.outliers(A, k=14, density=False).count == 0  # no ratio gap >= 2 among them


def test_no_outliers_in_a_pure_bulk():
    g = torch.Generator().manual_seed(3)
    A = torch.diag(torch.rand(1500, generator=g, dtype=F64))
    assert ck.outliers(A, k=4, iterations=40).count == 0


def test_outliers_from_given_results_cost_nothing_and_need_an_operator_otherwise():
    A = torch.diag(spectrum(0))
    e = ck.eigenvalues(A, k=12)
    d = ck.spectral_density(A, iterations=40, probes=4)
    r = ck.outliers(eigen=e, density=d)
    assert r.matvecs == 0 and r.count == 9
    with pytest.raises(ArgumentError, match="operator"):
        ck.outliers(eigen=e)
    with pytest.raises(ArgumentError):
        ck.outliers(A, k=0)


def test_gap_rule_matches_the_old_report_rule():
    A = torch.diag(torch.cat([torch.rand(200, dtype=F64) * 0.1, torch.tensor([1.0, 2.5, 6.0], dtype=F64)]))
    r = ck.outliers(A, k=6, density=False, tol=1e-8)
    assert r.count == 3 and r.gap_ratio == pytest.approx(1.0 / float(torch.diag(A)[:200].max()), rel=1e-6)
    assert r.threshold == pytest.approx(math.sqrt(1.0 * float(torch.diag(A)[:200].max())), rel=1e-6)


def test_grad_overlap_exact_and_orthonormalizes_a_block():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(30, 3, generator=g, dtype=F64)
    v = torch.randn(30, generator=g, dtype=F64)
    Q = torch.linalg.qr(V)[0]
    exact = float((Q.T @ v).square().sum() / (v @ v))
    assert ck.grad_overlap(V, v) == pytest.approx(exact, abs=1e-12)
    assert ck.grad_overlap(V, V[:, 0] + 2 * V[:, 2]) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(ck.grad_overlap(V, torch.zeros(30, dtype=F64)))
    with pytest.raises(ShapeError):
        ck.grad_overlap(V, torch.zeros(29, dtype=F64))


def test_diagonal_congruence_is_symmetric_and_exact():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 6, generator=g, dtype=F64)
    M = X @ X.T
    A = FunctionOperator(lambda V: M @ V, 6, F64)
    d = torch.rand(6, generator=g, dtype=F64) + 0.5
    D = DiagonalOperator(d)
    for C in (D @ A @ D, D @ (A @ D)):
        assert C.is_symmetric
        assert torch.allclose(C.dense(), torch.diag(d) @ M @ torch.diag(d), atol=1e-12)
    assert not (D @ A).is_symmetric
    # eigenvalues of P^-1 H equal those of P^-1/2 H P^-1/2
    top = ck.eigenvalues(D @ A @ D, k=1, tol=1e-10).values[0]
    ref = torch.linalg.eigvals(torch.diag(d**2) @ M).real.max()
    assert float(top) == pytest.approx(float(ref), rel=1e-8)
