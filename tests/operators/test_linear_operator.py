"""curvkit.linear_operator: the algebra keeps adjoints and symmetry right, and the algorithms that
need symmetry refuse what is not."""

import warnings

import numpy as np
import pytest
import torch

import curvkit as ck
from curvkit.errors import ArgumentError, ConvergenceWarning, ShapeError
from curvkit.linear_operator import BlockDiagonalOperator, FunctionOperator, IdentityOperator
from cases import BY_NAME, DT, assert_close, cached_ref, randn


def _dense_op(M, symmetric=False):
    return FunctionOperator(lambda V: M @ V, M.shape[1], DT, symmetric=symmetric, rmatmat=lambda V: M.T @ V,
                            shape=tuple(M.shape))


def test_rmatvec_of_a_product_is_the_transposed_product():
    """Regression: (A @ B).to_scipy().rmatvec(x) is B^T A^T x (it multiplied by A B)."""
    A0, B0 = randn(4, 4, seed=1), randn(4, 4, seed=2)
    A, B = _dense_op(A0), _dense_op(B0)
    x = randn(4, seed=3)
    S = (A @ B).to_scipy()
    assert np.allclose(S.rmatvec(x.numpy()), (B0.T @ A0.T @ x).numpy(), atol=1e-12)
    assert np.allclose(S.matvec(x.numpy()), (A0 @ B0 @ x).numpy(), atol=1e-12)
    assert np.allclose(S.rmatmat(np.eye(4)), (A0 @ B0).T.numpy(), atol=1e-12)
    # and for curvature operators: (H G)^T = G H
    case = BY_NAME["mlp-mse-mean"]
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    H, G = ck.hessian(model, loss_fn, batches), ck.ggn(model, loss_fn, batches)
    Hd, Gd = cached_ref("hessian", case.name), cached_ref("ggn", case.name)
    v = randn(H.shape[0], seed=4)
    assert_close(torch.from_numpy((H @ G).to_scipy().rmatvec(v.numpy())), Gd @ Hd @ v)
    assert_close((H @ G).T @ v, Gd @ Hd @ v)


def test_adjoints_and_symmetry_flags():
    A0, B0 = randn(3, 5, seed=1), randn(5, 3, seed=2)
    A, B = _dense_op(A0), _dense_op(B0)
    assert A.T.shape == (5, 3) and A.T.T is A
    assert_close(A.T.dense(), A0.T)
    assert_close((A @ B).T.dense(), B0.T @ A0.T)
    S0 = randn(3, 3, seed=3)
    S = _dense_op(S0 + S0.T, symmetric=True)
    I = IdentityOperator(3, DT)
    assert S.is_symmetric and S.T is S
    assert (S @ S).is_symmetric and (S @ I).is_symmetric and (S + 2 * S).is_symmetric
    assert not (S @ (2 * S)).is_symmetric  # symmetric in fact, but not known to be: refused, not guessed
    assert not (A @ B).is_symmetric and not (_dense_op(S0) + S).is_symmetric
    assert_close((3 * A - A).T.dense(), 2 * A0.T)
    with pytest.raises(ArgumentError, match="no product with its transpose.*rmatmat="):
        FunctionOperator(lambda V: S0 @ V, 3, DT, symmetric=False).rmatmat(randn(3))
    with pytest.raises(ShapeError, match="cannot combine"):
        A + B


@pytest.mark.parametrize("algorithm", ["eigenvalues", "solve", "spectral_density", "power_iteration"])
def test_algorithms_that_assume_symmetry_refuse_a_product(algorithm):
    """Regression: ck.eigenvalues, ck.solve, ck.spectral_density and ck.power_iteration refuse a
    non-symmetric operator (they returned numbers that meant nothing)."""
    case = BY_NAME["mlp-mse-mean"]
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    H, G = ck.hessian(model, loss_fn, batches), ck.ggn(model, loss_fn, batches)
    b = randn(H.shape[0])
    call = {"eigenvalues": lambda A: ck.eigenvalues(A, k=2), "solve": lambda A: ck.solve(A, b, damping=1.0),
            "spectral_density": lambda A: ck.spectral_density(A, iterations=5, probes=2),
            "power_iteration": lambda A: ck.power_iteration(A, max_matvecs=5)}[algorithm]
    for bad in (H @ G, FunctionOperator(lambda V: H @ V, H.shape[0], DT, symmetric=False), torch.triu(G.dense())):
        with pytest.raises(ArgumentError, match="needs a symmetric operator"):
            call(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the budgets here are tiny on purpose
        call(G @ G)  # symmetric: accepted


def test_algorithms_refuse_numpy_with_a_shape_error():
    with pytest.raises(ShapeError, match="expected a torch operator, got a numpy ndarray.*torch.as_tensor"):
        ck.eigenvalues(np.eye(4), k=1)
    with pytest.raises(ShapeError, match="numpy"):
        ck.trace(np.eye(4))


def test_blocks_are_a_block_diagonal_operator_of_real_operators():
    """Regression: H.blocks() is a BlockDiagonalOperator (a mapping of blocks too) whose blocks are
    operators of H's own class over each layer's parameters."""
    case = BY_NAME["convbn-ce-mean"]
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    full = cached_ref("ggn", case.name)
    for make in (ck.hessian, ck.ggn, ck.fisher):
        A = make(model, loss_fn, batches)
        B = A.blocks()
        assert isinstance(B, BlockDiagonalOperator) and B.shape == A.shape and B.is_symmetric
        assert list(B) == ["conv", "bn", "fc"] and len(B) == 3
        assert all(type(block) is type(A) for block in B.values())
        assert [block.param_names for block in B.values()] == [["conv.weight", "conv.bias"], ["bn.weight", "bn.bias"],
                                                               ["fc.weight", "fc.bias"]]
    G = ck.ggn(model, loss_fn, batches).blocks()
    Bd, i = G.dense(), 0
    for block in G.values():
        n = block.shape[0]
        assert_close(Bd[i : i + n, i : i + n], full[i : i + n, i : i + n])
        assert torch.count_nonzero(Bd[i : i + n, i + n :]) == 0
        i += n
    with pytest.raises(ArgumentError, match="at least one block"):
        BlockDiagonalOperator({})
