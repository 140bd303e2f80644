"""M-FAC (curvkit.approx.mfac) against dense float64 matrices: the operator, its inverse and the
inverse's diagonal, the blocked variant, the sliding window, and the model-built window against
ck.fisher(kind="empirical")."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.approx.mfac import MFACOperator, mfac
from curvkit.errors import ArgumentError, NonFiniteError, ShapeError
from curvkit.linear_operator import BlockDiagonalOperator

D64 = torch.float64


def _grads(m, d, seed=0):
    return torch.randn(m, d, dtype=D64, generator=torch.Generator().manual_seed(seed))


def _dense(G, lam):
    return lam * torch.eye(G.shape[1], dtype=D64) + G.T @ G / G.shape[0]


@pytest.mark.parametrize("m,d", [(5, 12), (12, 7), (1, 4)])
def test_products_inverse_and_inverse_diagonal_match_the_dense_matrix(m, d):
    G, lam = _grads(m, d), 0.03
    F, E = MFACOperator(G, damping=lam), _dense(G, lam)
    Einv = torch.linalg.inv(E)
    V = _grads(d, 3, seed=1)
    assert torch.allclose(F @ V, E @ V, atol=1e-10, rtol=0)
    assert torch.allclose(F.inverse() @ V, Einv @ V, atol=1e-10 * Einv.abs().max(), rtol=0)
    assert torch.allclose(F.inverse().diagonal(), Einv.diagonal(), atol=1e-10 * Einv.abs().max(), rtol=0)
    assert torch.allclose(F.diagonal(), E.diagonal(), atol=1e-12, rtol=0)
    assert torch.allclose(F.inverse().dense() @ E, torch.eye(d, dtype=D64), atol=1e-10)


def test_blocked_variant_is_block_diagonal_with_a_window_per_block():
    m, d, B, lam = 6, 11, 4, 0.1  # blocks 4, 4, 3 (the last padded inside)
    G = _grads(m, d)
    F = MFACOperator(G, damping=lam, block_size=B)
    E = torch.zeros(d, d, dtype=D64)
    for s in range(0, d, B):
        E[s:s + B, s:s + B] = _dense(G[:, s:s + B], lam)
    Einv = torch.linalg.inv(E)
    assert torch.allclose(F.dense(), E, atol=1e-10, rtol=0)
    assert torch.allclose(F.inverse().dense(), Einv, atol=1e-10, rtol=0)
    assert torch.allclose(F.inverse().diagonal(), Einv.diagonal(), atol=1e-10, rtol=0)
    blocks = F.blocks()
    assert isinstance(blocks, BlockDiagonalOperator) and list(blocks) == ["0:4", "4:8", "8:11"]
    assert torch.allclose(blocks.dense(), E, atol=1e-10, rtol=0)
    assert torch.allclose(BlockDiagonalOperator({k: b.inverse() for k, b in blocks.items()}).dense(), Einv,
                          atol=1e-10, rtol=0)


def test_sliding_window_keeps_the_last_gradients():
    m, d, lam = 4, 9, 0.05
    G = _grads(10, d)
    F = MFACOperator(dim=d, window=m, damping=lam, dtype=D64)
    assert torch.allclose(F.inverse().dense(), torch.eye(d, dtype=D64) / lam)  # empty: damping only
    for k, g in enumerate(G):
        F.update(g)
        last = G[max(0, k + 1 - m): k + 1]  # the window not yet full averages over what it holds
        E = _dense(last, lam)
        assert torch.allclose(F.dense(), E, atol=1e-10, rtol=0)
        assert torch.allclose(F.inverse().dense(), torch.linalg.inv(E), atol=1e-9, rtol=0)
    assert F.count == m
    assert torch.allclose(MFACOperator(G, damping=lam, window=m).dense(), F.dense(), atol=1e-12, rtol=0)


def test_window_of_a_model_is_the_empirical_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=g, dtype=D64), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    lam = 1e-3
    F = mfac(model, nn.CrossEntropyLoss(), data, window=10, damping=lam)
    E = ck.fisher(model, nn.CrossEntropyLoss(), data).dense() + lam * torch.eye(F.shape[0], dtype=D64)
    assert torch.allclose(F.dense(), E, atol=1e-10, rtol=0)
    assert torch.allclose(F.inverse().diagonal(), torch.linalg.inv(E).diagonal(), atol=1e-10 * float(1 / lam),
                          rtol=0)
    assert F.param_names == [n for n, _ in model.named_parameters()]
    # a smaller window takes the first examples, in the data's order
    F7 = mfac(model, nn.CrossEntropyLoss(), data, window=7, damping=lam)
    first7 = (data[0][0], data[0][1]), (data[1][0][:2], data[1][1][:2])
    E7 = ck.fisher(model, nn.CrossEntropyLoss(), list(first7)).dense() + lam * torch.eye(F.shape[0], dtype=D64)
    assert torch.allclose(F7.dense(), E7, atol=1e-10, rtol=0)


def test_bad_input_is_refused_with_what_to_do():
    with pytest.raises(ArgumentError, match="damping"):
        MFACOperator(_grads(2, 3), damping=0.0)
    with pytest.raises(ArgumentError, match="window"):
        MFACOperator(dim=3, window=0, damping=1.0)
    with pytest.raises(ArgumentError, match="block_size"):
        MFACOperator(_grads(2, 3), damping=1.0, block_size=0)
    with pytest.raises(ShapeError, match=r"\(3,\)"):
        MFACOperator(_grads(2, 3), damping=1.0).update(torch.zeros(4, dtype=D64))
    G = _grads(2, 3)
    G[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        MFACOperator(G, damping=1.0).inverse() @ torch.ones(3, dtype=D64)


def test_a_float32_window_gives_the_inverse_diagonal_of_its_float64_copy():
    # a nearly rank-2 float32 window of 50k entries: a Gram matrix summed in float32 errs by more
    # than damping * m, which made damping m I + G G^T indefinite (NonFiniteError)
    gen = torch.Generator().manual_seed(0)
    m, d = 16, 50_000
    G = (torch.randn(m, 2, generator=gen) @ torch.randn(2, d, generator=gen)
         + 1e-3 * torch.randn(m, d, generator=gen)).float()
    lam = 1e-3 * float((G**2).mean())
    ref = MFACOperator(G.double(), damping=lam).inverse().diagonal()
    diag = MFACOperator(G, damping=lam).inverse().diagonal()
    assert diag.dtype == torch.float32
    assert float(((diag.double() - ref) / ref).abs().max()) < 1e-5
