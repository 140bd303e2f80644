"""bf16 models: every operator and algorithm runs, products summed in float32, results within
bf16's precision of the float32 model's, and the error bars honest."""

import pytest
import torch
from torch import nn

import curvkit as ck

MAKERS = [ck.hessian, ck.ggn, ck.fisher, ck.kfac]


def _pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))
    half = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))
    half.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    return model, half.to(torch.bfloat16), data, [(a.to(torch.bfloat16), b) for a, b in data]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_products_are_summed_in_float32_and_close_to_the_float32_model(make):
    model, half, data, half_data = _pair()
    A, B = make(model, nn.CrossEntropyLoss(), data), make(half, nn.CrossEntropyLoss(), half_data)
    assert B.dtype == torch.bfloat16
    v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(2))
    a, b, b16 = A @ v, B @ v, B @ v.to(torch.bfloat16)
    assert b.dtype == b16.dtype == torch.float32  # float32 or bf16 vectors alike
    if make is not ck.kfac:  # a pass through the model multiplies the vector in the model's dtype
        assert torch.equal(b, b16)
    assert float((a - b).norm() / a.norm()) < 2e-2  # bf16 rounding (eps 7.8e-3) through a few layers


def test_algorithms_run_on_bf16_and_their_error_bars_are_honest():
    model, half, data, half_data = _pair()
    H, Hb = ck.hessian(model, nn.CrossEntropyLoss(), data), ck.hessian(half, nn.CrossEntropyLoss(), half_data)
    top, topb = ck.eigenvalues(H, k=1, tol=1e-4), ck.eigenvalues(Hb, k=1, tol=1e-2)
    assert topb.converged and topb.values.dtype == torch.float32
    assert abs(float(topb.values[0] - top.values[0])) <= 1e-2 * float(top.values[0])
    # the reported residual is the direct one, from a product of the bf16 operator as it is
    direct = (Hb @ topb.vectors[:, 0] - topb.values[0] * topb.vectors[:, 0]).norm()
    assert torch.allclose(topb.residuals[0], direct, rtol=1e-2)
    tr = ck.trace(Hb, probes=30, seed=0)
    exact = float(torch.trace(H.dense()))
    assert abs(tr.value - exact) < 4 * tr.stderr + 2e-2 * abs(exact)
    assert ck.diagonal(Hb, probes=4).value.dtype == torch.float32
    assert ck.spectral_density(Hb, iterations=10, probes=2).density.isfinite().all()
    G = ck.ggn(half, nn.CrossEntropyLoss(), half_data)
    r = ck.solve(G, torch.ones(G.shape[0]), damping=1e-1, tol=1e-2)
    assert r.converged and r.x.dtype == torch.float32
