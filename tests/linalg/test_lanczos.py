import numpy as np
import pytest
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from curvkit.errors import ConvergenceWarning, NonFiniteError, ShapeError
from curvkit.linalg import BlockResults, eigenvalues

from ._spectra import SPECTRA, spectrum, sym


def reference(A, k, which):
    ev = torch.linalg.eigvalsh(A)
    if which == "largest":
        return ev.flip(0)[:k]
    if which == "smallest":
        return ev[:k]
    return ev[ev.abs().argsort(descending=True)][:k]


def true_residuals(A, r):
    return (A @ r.vectors - r.vectors * r.values).norm(dim=0)


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_matches_eigvalsh(name, which):
    if (name, which) == ("decaying", "smallest"):
        pytest.skip("smallest of a decaying spectrum cluster at 0: hopeless without shift-invert, for eigsh too")
    A = sym(spectrum(name))
    tol, k = 1e-6, 5
    r = eigenvalues(A, k=k, which=which, tol=tol, max_matvecs=3000)
    ref = reference(A, k, which)
    scale = ref.abs().max()
    assert r.converged
    # an eigenvalue is within its residual of an exact one: |theta - lambda| <= ||r|| <= tol * scale
    assert torch.allclose(r.values, ref, rtol=0, atol=float(tol * scale))
    assert (r.residuals <= tol * r.values.abs().max()).all()
    # the residuals read off the recurrence are the true ones
    assert torch.allclose(r.residuals, true_residuals(A, r), rtol=0, atol=1e-12 * float(scale))
    assert torch.allclose(r.vectors.T @ r.vectors, torch.eye(k, dtype=A.dtype), atol=1e-10)
    assert r.matvecs <= 3000


def test_block_size_and_sorting():
    A = sym(spectrum("indefinite"))
    for b in (2, 3):
        r = eigenvalues(A, k=4, which="magnitude", tol=1e-8, block_size=b, max_matvecs=3000)
        assert r.converged and r.matvecs % b == 0
        assert torch.allclose(r.values, reference(A, 4, "magnitude"), atol=1e-8 * 12.5)
        assert torch.allclose(r.residuals, true_residuals(A, r), atol=1e-11)
        assert (r.values.abs().diff() <= 0).all()
    s = eigenvalues(A, k=3, which="smallest", tol=1e-8)
    assert (s.values.diff() >= 0).all() and s.values[0] < 0


def test_same_seed_same_result():
    A = sym(spectrum("clustered"))
    r1, r2 = eigenvalues(A, k=3, seed=7), eigenvalues(A, k=3, seed=7)
    assert torch.equal(r1.values, r2.values) and torch.equal(r1.vectors, r2.vectors)
    assert r1.matvecs == r2.matvecs


def _eigsh_matvecs(A, k, which, tol):
    """Fewest eigsh products meeting our criterion max ||Av - lv|| <= tol max|l| (eigsh's own
    criterion is per-eigenvalue, so we loosen its tol step by step and keep the cheapest run
    that still reaches the same accuracy: the fairest comparison for eigsh)."""
    An = A.numpy()
    v0 = np.random.default_rng(0).standard_normal(An.shape[0])
    best = None
    for j in range(6):
        count = [0]

        def mv(x):
            count[0] += 1 if x.ndim == 1 else x.shape[1]
            return An @ x

        op = LinearOperator(An.shape, matvec=mv, dtype=np.float64)
        try:
            w, V = eigsh(op, k=k, which={"largest": "LA", "smallest": "SA", "magnitude": "LM"}[which],
                         tol=tol * 2**j, v0=v0)
        except ArpackNoConvergence:
            continue
        if np.linalg.norm(An @ V - V * w, axis=0).max() <= tol * np.abs(w).max():
            best = count[0] if best is None else min(best, count[0])
    return best


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
@pytest.mark.parametrize("name,which", [
    ("decaying", "largest"), ("clustered", "largest"), ("clustered", "smallest"),
    ("indefinite", "largest"), ("indefinite", "smallest"), ("lowrank", "magnitude"), ("lowrank", "smallest"),
])
@pytest.mark.parametrize("block_size", [1, 2])
def test_matvecs_vs_eigsh(name, which, tol, block_size):
    A = sym(spectrum(name))
    ours = eigenvalues(A, k=5, which=which, tol=tol, block_size=block_size)
    assert ours.converged
    assert torch.allclose(ours.values, reference(A, 5, which), atol=tol * float(ours.values.abs().max()))
    theirs = _eigsh_matvecs(A, 5, which, tol)
    assert ours.matvecs <= 1.5 * theirs, (ours.matvecs, theirs)


def test_budget_too_small_warns_and_says_so():
    A = sym(spectrum("lowrank"))
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        r = eigenvalues(A, k=5, which="smallest", tol=1e-8, max_matvecs=40)
    assert not r.converged and r.matvecs <= 40
    # the residuals still tell the truth about the unconverged vectors
    assert torch.allclose(r.residuals, true_residuals(A, r), atol=1e-12)
    assert (r.residuals > 1e-8 * r.values.abs().max()).any()


def test_bad_input():
    A = sym(spectrum("decaying", n=10))
    with pytest.raises(ShapeError, match="k must be"):
        eigenvalues(A, k=10)
    with pytest.raises(ShapeError, match="square"):
        eigenvalues(torch.zeros(5, 4, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match="which"):
        eigenvalues(A, k=2, which="biggest")
    with pytest.raises(ShapeError, match="blocks"):
        eigenvalues(A, k=2, by="layer")


class _NaNAfter:
    """A matrix whose products turn NaN after a few calls (a diverged model)."""

    def __init__(self, A, good):
        self.A, self.good, self.calls = A, good, 0
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V):
        self.calls += 1
        out = self.A @ V
        return out if self.calls <= self.good else out * float("nan")


def test_nan_product_stops():
    A = _NaNAfter(sym(spectrum("indefinite")), good=3)
    with pytest.raises(NonFiniteError, match="non-finite"):
        eigenvalues(A, k=3)
    assert A.calls == 4  # stopped at the first bad product


def test_small_operator_is_solved_densely():
    lam = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.1, 4.0], dtype=torch.float64)
    A = sym(lam)
    r = eigenvalues(A, k=2, which="magnitude")
    assert r.converged and r.matvecs == 6
    assert torch.allclose(r.values, torch.tensor([4.0, 3.0], dtype=torch.float64), atol=1e-12)


def test_tiny_network_hessian(tiny_hessian):
    H, D = tiny_hessian
    for which in ("largest", "smallest"):
        r = eigenvalues(H, k=3, which=which, tol=1e-6)
        ref = reference(D, 3, which)
        assert r.converged
        assert torch.allclose(r.values, ref, atol=1e-6 * float(ref.abs().max()))
        assert torch.allclose(r.residuals, true_residuals(D, r), atol=1e-10)


def test_by_layer(tiny_hessian):
    H, D = tiny_hessian
    res = eigenvalues(H, k=2, tol=1e-8, by="layer")
    assert isinstance(res, BlockResults) and list(res) == ["0", "2", "4"]
    start = 0
    for name, r in res.items():
        n = r.vectors.shape[0]
        block = D[start : start + n, start : start + n]
        start += n
        assert torch.allclose(r.values, reference(block, 2, "largest"), atol=1e-7)
    assert start == D.shape[0]
    assert res.matvecs == sum(r.matvecs for _, r in res.items())
