"""ck.input_hessian: the block-diagonal operator of per-example input Hessians against dense
autograd Hessians (float64, 1e-10), and the linear algebra per example through by="example"."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, ShapeError

from .conftest import hessians

D = torch.float64


def net(d=3, out=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, out)).to(D)


def test_the_operator_is_the_block_diagonal_of_per_example_hessians():
    f = net()
    x = torch.randn(4, 3, dtype=D)
    H = ck.input_hessian(f, x)
    assert H.shape == (12, 12) and H.is_symmetric
    torch.testing.assert_close(H.dense(), torch.block_diag(*hessians(f, x)), atol=1e-10, rtol=0)
    blocks = H.blocks("example")
    assert list(blocks) == ["0", "1", "2", "3"]
    torch.testing.assert_close(blocks["2"].dense(), hessians(f, x)[2], atol=1e-10, rtol=0)


def test_vector_outputs_have_a_block_per_example_and_component():
    f = net(out=2)
    x = torch.randn(3, 3, dtype=D)
    H = ck.input_hessian(f, x)
    ref = torch.stack([torch.autograd.functional.hessian(lambda p: f(p[None])[0, k], xi) for xi in x for k in range(2)])
    torch.testing.assert_close(H.dense(), torch.block_diag(*ref), atol=1e-10, rtol=0)
    blocks = H.blocks("example")
    assert list(blocks)[:3] == ["0,0", "0,1", "1,0"]
    torch.testing.assert_close(blocks["1,1"].dense(), ref[3], atol=1e-10, rtol=0)


def test_linear_algebra_runs_per_example():
    f = net(d=6)
    x = torch.randn(3, 6, dtype=D)
    H = ck.input_hessian(f, x)
    dense = hessians(f, x)
    top = ck.eigenvalues(H, k=2, by="example", tol=1e-10)
    for b in range(3):
        torch.testing.assert_close(top[str(b)].values, torch.linalg.eigvalsh(dense[b]).flip(0)[:2], atol=1e-8, rtol=0)
    tr = ck.trace(H, by="example", method="hutchinson", probes=30, seed=0)
    lap = ck.laplacian(f, x, create_graph=False).value
    for b in range(3):
        assert abs(tr[str(b)].value - float(lap[b])) < 4 * tr[str(b)].stderr
    diag = ck.diagonal(H, by="example", probes=40, seed=0)
    assert ((diag["1"].value - dense[1].diagonal()).abs() < 4 * diag["1"].stderr + 1e-12).all()


def test_bad_inputs():
    f = net()
    with pytest.raises(ShapeError, match="floating point"):
        ck.input_hessian(f, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ShapeError, match="one vector"):
        ck.input_hessian(lambda x: f(x)[None], torch.randn(2, 3, dtype=D))
    with pytest.raises(ArgumentError, match="by='example'"):
        ck.input_hessian(f, torch.randn(2, 3, dtype=D)).blocks("layer")
