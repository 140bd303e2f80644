"""Sophia against hand computations: the clipped update, decoupled decay, the GNB estimator."""

import torch
from torch import nn

import curvkit as ck
from curvkit.linalg._util import generator
from curvkit.optim import Sophia
from curvkit.optim._diag import gnb_diagonal


def _quadratic():
    a = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)  # diagonal Hessian: Hutchinson exact
    w0 = torch.tensor([1.0, -2.0, 3.0, 1e-3], dtype=torch.float64)
    return a, w0


def test_one_step_matches_a_hand_computation():
    a, w0 = _quadratic()
    lr, (b1, b2), gamma, wd = 0.1, (0.965, 0.99), 0.05, 0.2
    w = nn.Parameter(w0.clone())
    opt = Sophia([w], lr=lr, betas=(b1, b2), gamma=gamma, weight_decay=wd)
    opt.step(lambda: 0.5 * (a * w**2).sum())
    m, h = (1 - b1) * a * w0, (1 - b2) * a
    ratio = (m / torch.clamp(gamma * h, min=1e-12)).clamp(-1, 1)
    assert torch.allclose(w.detach(), w0 * (1 - lr * wd) - lr * ratio, rtol=1e-12)
    assert ratio.abs().max() == 1 and ratio.abs().min() < 1  # both the clipped and the Newton regime
    assert torch.equal(opt.state[w]["exp_avg"], m)  # the decay is decoupled: not in the momentum


def test_negative_curvature_falls_back_to_a_sign_step():
    w = nn.Parameter(torch.tensor([0.5, -0.5], dtype=torch.float64))
    opt = Sophia([w], lr=0.1, weight_decay=0.0)
    opt.step(lambda: -(w**2).sum())  # h < 0: max(gamma h, eps) = eps, the ratio clips to +-1
    assert torch.allclose(w.detach(), torch.tensor([0.6, -0.6], dtype=torch.float64))


def test_hessian_ema_is_refreshed_every_k_steps():
    a, w0 = _quadratic()
    w = nn.Parameter(w0.clone())
    opt = Sophia([w], lr=0.01, update_each=4)
    hs = []
    for _ in range(9):
        opt.step(lambda: 0.5 * (a * w**2).sum())
        hs.append(opt.state[w]["hessian"].clone())
    b2 = 0.99
    assert all(torch.equal(hs[0], hs[i]) for i in range(4))
    assert torch.allclose(hs[4], (1 - b2**2) * a) and torch.allclose(hs[8], (1 - b2**3) * a)


def test_gnb_estimate_is_the_gauss_newton_diagonal_in_expectation():
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    exact = torch.diagonal(ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense())
    params, gen = list(model.parameters()), generator(0)
    logits = model(x)
    S = torch.stack([torch.cat([d.reshape(-1) for d in gnb_diagonal(logits, params, gen)]) for _ in range(1500)], 1)
    mean, stderr = S.mean(1), S.std(1) / S.shape[1] ** 0.5
    assert ((mean - exact).abs() < 4 * stderr).all()
    assert ((mean - exact).abs() / stderr).pow(2).mean().sqrt() < 2  # not an inflated stderr either


def test_gnb_with_sequence_logits():
    torch.manual_seed(0)
    emb, head = nn.Embedding(5, 8), nn.Linear(8, 5)
    tokens = torch.randint(0, 5, (4, 6))
    opt = Sophia(list(emb.parameters()) + list(head.parameters()), lr=0.05, estimator="gnb", update_each=2)

    def closure():
        logits = head(emb(tokens[:, :-1]))  # (batch, time, vocab)
        return nn.functional.cross_entropy(logits.reshape(-1, 5), tokens[:, 1:].reshape(-1)), logits

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
