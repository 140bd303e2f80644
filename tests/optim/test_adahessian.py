"""AdaHessian against hand computations: the Hutchinson diagonal, the update, conv averaging."""

import pytest
import torch
from torch import nn

from curvkit.linalg._util import generator, rademacher
from curvkit.linalg.diagonal import hutchinson_samples
from curvkit.optim import AdaHessian
from curvkit.optim._diag import hvp_operator

from ._problems import flat_hessian


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    return model, lambda f: nn.functional.mse_loss(f(x), y)


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_diagonal_is_the_hessian_diagonal_in_expectation():
    model, loss = _mlp()
    exact = torch.diagonal(flat_hessian(model, loss))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model), params, create_graph=True)
    S = hutchinson_samples(hvp_operator(grads, params), 400, generator(3))
    mean, stderr = S.mean(1), S.std(1) / 400**0.5
    exact_rows = stderr == 0  # rows with no off-diagonal coupling: every sample is exact
    assert torch.allclose(mean[exact_rows], exact[exact_rows], atol=1e-12)
    assert ((mean - exact)[~exact_rows].abs() < 4 * stderr[~exact_rows]).all()


def _probe(n, seed):
    return rademacher(n, 1, generator(seed), torch.float64, "cpu")[:, 0]


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_one_step_matches_a_hand_computation(power):
    model, loss = _mlp()
    H = flat_hessian(model, loss)
    p0 = _flat(model.parameters()).detach().clone()
    g = _flat(torch.autograd.grad(loss(model), list(model.parameters()))).detach()
    D = _probe(len(p0), 7) * (H @ _probe(len(p0), 7))  # the optimizer's first probe, same seed
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-4
    opt = AdaHessian(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, hessian_power=power, seed=7)
    opt.step(lambda: loss(model))
    v = _flat(opt.state[p]["exp_hessian_diag_sq"] for p in model.parameters())
    assert torch.allclose(v, (1 - b2) * D**2, rtol=1e-10, atol=1e-14)
    # bias corrections undo the (1 - beta) factors: the first step is g / (|D|^power + eps)
    expected = p0 - lr * g / (D.abs() ** power + eps)
    assert torch.allclose(_flat(model.parameters()), expected, rtol=1e-10, atol=1e-12)


def test_weight_decay_is_decoupled():
    a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)  # diagonal Hessian: Hutchinson is exact
    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    lr, wd, eps = 0.1, 0.3, 1e-4
    w = nn.Parameter(w0.clone())
    opt = AdaHessian([w], lr=lr, weight_decay=wd, eps=eps)
    opt.step(lambda: 0.5 * (a * w**2).sum())
    assert torch.allclose(w.detach(), w0 - lr * (a * w0 / (a + eps) + wd * w0), rtol=1e-12)
    assert torch.equal(opt.state[w]["exp_avg"], (1 - 0.9) * a * w0)  # the decay is not in the momentum


def test_conv_kernel_curvature_is_averaged_over_space():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    loss = lambda f: nn.functional.mse_loss(f(x), y)  # noqa: E731
    H = flat_hessian(model, loss)
    z = _probe(H.shape[0], 0)
    D = (z * (H @ z)).split([p.numel() for p in model.parameters()])
    opt = AdaHessian(model.parameters(), seed=0)
    opt.step(lambda: loss(model))
    kernel = model[0].weight
    Dk = D[0].view_as(kernel).abs().mean((2, 3), keepdim=True).expand_as(kernel)
    v = opt.state[kernel]["exp_hessian_diag_sq"]
    assert torch.allclose(v, (1 - 0.999) * Dk**2, rtol=1e-10)
    assert torch.equal(v, v[:, :, :1, :1].expand_as(v))  # one value per (out, in) channel pair
    # other parameters are not averaged
    lin_w = model[3].weight
    assert torch.allclose(opt.state[lin_w]["exp_hessian_diag_sq"], (1 - 0.999) * D[2].view_as(lin_w) ** 2)


def test_every_reuses_the_diagonal_between_refreshes():
    model, loss = _mlp()
    opt = AdaHessian(model.parameters(), lr=0.01, every=3)
    p = next(model.parameters())
    seen = []
    for _ in range(7):
        opt.step(lambda: loss(model))
        seen.append((opt.state[p]["exp_hessian_diag_sq"].clone(), opt.state[p]["hessian_step"]))
    assert [s for _, s in seen] == [1, 1, 1, 2, 2, 2, 3]
    assert torch.equal(seen[0][0], seen[2][0]) and not torch.equal(seen[2][0], seen[3][0])
