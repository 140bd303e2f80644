import pytest
import torch

from curvkit.errors import ConvergenceWarning, NonFiniteError, ShapeError
from curvkit.linalg import solve

from ._spectra import spectrum, sym

F64 = torch.float64


def spd(n=150, cond=1e3, seed=0):
    return sym(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=F64), seed)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_matches_linalg_solve(damping):
    A = spd()
    b = torch.randn(150, generator=torch.Generator().manual_seed(1), dtype=F64)
    r = solve(A, b, damping=damping, tol=1e-8)
    M = A + damping * torch.eye(150, dtype=F64)
    assert r.converged and r.residual <= 1e-8
    assert ((b - M @ r.x).norm() / b.norm()) <= 1e-8  # the reported residual is the true one
    x = torch.linalg.solve(M, b)
    cond = float(torch.linalg.cond(M))
    assert (r.x - x).norm() / x.norm() <= cond * 1e-8
    assert r.x.shape == (150,)


def test_block_of_right_hand_sides():
    A = spd(cond=1e2)
    B = torch.randn(150, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    B[:, 3] = 0  # a zero right-hand side is solved by x = 0 at no cost
    r = solve(A, B, tol=1e-10)
    assert r.converged and r.x.shape == (150, 4)
    assert torch.allclose(r.x, torch.linalg.solve(A, B), atol=1e-7)
    singles = sum(solve(A, B[:, j], tol=1e-10).matvecs for j in range(4))
    # each column runs its own CG: the same products as solving one by one (in exact arithmetic;
    # rounding may shift a column's stop by a step and its residual check), in fewer passes
    assert abs(r.matvecs - singles) <= 2 * 3


def test_indefinite_is_reported():
    A = sym(spectrum("indefinite", n=100))
    b = torch.ones(100, dtype=F64)
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        r = solve(A, b)
    assert not r.converged
    # damping beyond -lambda_min makes it solvable
    r = solve(A, b, damping=-float(torch.linalg.eigvalsh(A)[0]) + 0.5, tol=1e-8)
    assert r.converged


def test_budget_and_x0():
    A = spd(cond=1e4)
    b = torch.ones(150, dtype=F64)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        r = solve(A, b, tol=1e-10, max_matvecs=10)
    assert not r.converged and r.matvecs <= 10
    x = torch.linalg.solve(A, b)
    r0 = solve(A, b, x0=x, tol=1e-8)
    assert r0.converged and r0.matvecs == 1  # only the check of the starting residual


def test_bad_input():
    A = spd(n=20)
    with pytest.raises(ShapeError, match="dtype"):
        solve(A, torch.ones(20, dtype=torch.float32))
    with pytest.raises(ShapeError, match="shape"):
        solve(A, torch.ones(21, dtype=F64))
    with pytest.raises(ShapeError, match="square"):
        solve(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(NonFiniteError):
        solve(A * float("nan"), torch.ones(20, dtype=F64))


def test_tiny_network_damped_ggn():
    import curvkit.operators as ops

    from ._spectra import tiny_mlp_problem

    model, loss, data = tiny_mlp_problem()
    G = ops.ggn(model, loss, data)
    D = G.dense()
    b = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
    r = solve(G, b, damping=1e-2, tol=1e-8)
    x = torch.linalg.solve(D + 1e-2 * torch.eye(G.shape[0], dtype=F64), b)
    assert r.converged
    assert (r.x - x).norm() / x.norm() < 1e-5
