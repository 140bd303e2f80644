"""SOAP against dense float64 references: Adam in the eigenbasis by hand, a transcription of
the reference implementation across basis refreshes, blocking, groups, validation, NaN guard."""


import pytest
import torch
from torch import nn

from curvkit.errors import NonFiniteError
from curvkit.optim import SOAP

from .test_shampoo import _grads, _run, _same_state, _state_copy

D = torch.float64


def _basis(A):
    return torch.linalg.eigh(A)[1].flip(1)


def test_first_steps_are_adam_in_the_eigenbasis_by_hand():
    (b1, b2), eps, lr, wd = (0.9, 0.8), 1e-8, 0.1, 0.2
    G1, G2 = _grads((5, 5), 2, seed=10)
    W0 = torch.randn(5, 5, dtype=D)
    W = nn.Parameter(W0.clone())
    opt = SOAP([W], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, every=10)
    _run([W], [[G1]], opt)
    assert torch.equal(W.detach(), W0)  # the first step only takes the basis
    QL, QR = _basis(G1 @ G1.T), _basis(G1.T @ G1)
    _run([W], [[G2]], opt)
    Gp = QL.T @ G2 @ QR
    m, v = (1 - b1) * Gp, (1 - b2) * Gp**2
    step = lr * (1 - b2) ** 0.5 / (1 - b1)
    expect = (W0 - step * QL @ (m / (v.sqrt() + eps)) @ QR.T) * (1 - lr * wd)
    assert torch.allclose(W.detach(), expect, atol=1e-12, rtol=0)


def _reference_soap(params, grads, lr, b1, b2, sb, eps, wd, freq):
    """A transcription of github.com/nikhilvyas/SOAP's step for matrices and vectors."""
    states = [dict() for _ in params]
    for gs in grads:
        for p, g, s in zip(params, gs, states):
            mat = g.dim() == 2
            if "m" not in s:
                s.update(step=0, m=torch.zeros_like(g), v=torch.zeros_like(g))
                if mat:
                    s["GG"] = [(1 - sb) * g @ g.T, (1 - sb) * g.T @ g]
                    s["Q"] = [_basis(x) for x in s["GG"]]
                    continue
            proj = (lambda x: s["Q"][0].T @ x @ s["Q"][1]) if mat else (lambda x: x)
            back = (lambda x: s["Q"][0] @ x @ s["Q"][1].T) if mat else (lambda x: x)
            gp = proj(g)
            s["step"] += 1
            s["m"] = b1 * s["m"] + (1 - b1) * gp
            s["v"] = b2 * s["v"] + (1 - b2) * gp**2
            ss = lr * (1 - b2 ** s["step"]) ** 0.5 / (1 - b1 ** s["step"])
            p -= ss * back(s["m"] / (s["v"].sqrt() + eps))
            p -= lr * wd * p
            if mat:
                s["m"] = back(s["m"])
                s["GG"] = [sb * s["GG"][0] + (1 - sb) * g @ g.T, sb * s["GG"][1] + (1 - sb) * g.T @ g]
                if s["step"] % freq == 0:
                    v, new = s["v"], []
                    for ind, (F, Q) in enumerate(zip(s["GG"], s["Q"])):
                        idx = torch.argsort(torch.diag(Q.T @ F @ Q), descending=True)
                        v, Q = v.index_select(ind, idx), Q[:, idx]
                        new.append(torch.linalg.qr(F @ Q)[0])
                    s["v"], s["Q"] = v, new
                s["m"] = proj(s["m"])


def test_matches_the_reference_across_basis_refreshes():
    kw = dict(lr=0.05, b1=0.9, b2=0.95, sb=0.8, eps=1e-8, wd=0.01, freq=2)
    Gs = _grads((5, 5), 7, seed=11)
    bs = _grads((5,), 7, seed=12)
    W0, c0 = torch.randn(5, 5, dtype=D), torch.randn(5, dtype=D)
    W, c = nn.Parameter(W0.clone()), nn.Parameter(c0.clone())
    opt = SOAP([W, c], lr=kw["lr"], betas=(kw["b1"], kw["b2"]), shampoo_beta=kw["sb"], eps=kw["eps"],
               weight_decay=kw["wd"], every=kw["freq"])
    Wr = W0.clone()
    # the matrix against the reference; the vector against AdamW (ours moves vectors from the
    # first step on, where the reference skips every parameter's first step)
    _reference_soap([Wr], [[G] for G in Gs], **kw)
    _run([W, c], [[G, b] for G, b in zip(Gs, bs)], opt)
    assert torch.allclose(W.detach(), Wr, atol=1e-10, rtol=0)
    adam = torch.optim.AdamW([nn.Parameter(c0.clone())], lr=kw["lr"], betas=(kw["b1"], kw["b2"]), eps=kw["eps"],
                             weight_decay=0.0)
    ca = adam.param_groups[0]["params"][0]
    for b in bs:
        ca.grad = b.clone()
        adam.step()
        with torch.no_grad():
            ca.mul_(1 - kw["lr"] * kw["wd"])
    assert torch.allclose(c.detach(), ca.detach(), atol=1e-6, rtol=0)  # AdamW's eps is outside sqrt(bc2)


def test_eigh_refresh_diagonalises_the_factors():
    Gs = _grads((4, 6), 4, seed=13)
    W = nn.Parameter(torch.zeros(4, 6, dtype=D))
    opt = SOAP([W], lr=0.01, every=3, refresh="eigh")
    _run([W], [[G] for G in Gs], opt)  # steps: init, t=1, 2, 3 (refresh)
    st = opt.state[W]
    for F, Q in ((st["L0"], st["QL0"]), (st["R0"], st["QR0"])):
        M = Q.T @ F @ Q
        assert torch.allclose(M, torch.diag(torch.diagonal(M)), atol=1e-12)
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0], dtype=D), atol=1e-12)


def test_blocks_of_a_large_parameter_are_independent_parameters():
    Gs = _grads((7, 5), 6, seed=14)
    blocks = [(slice(r, r + 3), slice(c, c + 3)) for r in (0, 3, 6) for c in (0, 3)]
    W0 = torch.randn(7, 5, dtype=D)
    W = nn.Parameter(W0.clone())
    parts = [nn.Parameter(W0[b].clone()) for b in blocks]
    kw = dict(lr=0.05, betas=(0.9, 0.95), every=2, weight_decay=0.1, block_size=3)
    _run([W], [[G] for G in Gs], SOAP([W], **kw))
    _run(parts, [[G[b] for b in blocks] for G in Gs], SOAP(parts, **kw))
    for b, p in zip(blocks, parts):
        assert torch.allclose(W.detach()[b], p.detach(), atol=1e-12, rtol=0)


def test_param_groups_use_their_own_lr_and_weight_decay():
    Gs = _grads((3, 4), 4, seed=15)
    a0, b0 = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    a, b = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
    opt = SOAP([{"params": [a]}, {"params": [b], "lr": 0.3, "weight_decay": 0.5}], lr=0.01, every=2)
    _run([a, b], [[G, 2 * G] for G in Gs], opt)
    a1, b1 = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
    _run([a1], [[G] for G in Gs], SOAP([a1], lr=0.01, every=2))
    _run([b1], [[2 * G] for G in Gs], SOAP([b1], lr=0.3, weight_decay=0.5, every=2))
    assert torch.equal(a.detach(), a1.detach()) and torch.equal(b.detach(), b1.detach())
    assert not torch.equal(a.detach(), a0)


@pytest.mark.parametrize("where", ["gradient", "factor", "factor-at-refresh", "gradient-at-init"])
def test_nan_leaves_parameters_and_state_unchanged(where):
    Gs = _grads((4, 3), 3, seed=16)
    W, b = nn.Parameter(torch.randn(4, 3, dtype=D)), nn.Parameter(torch.randn(4, dtype=D))
    opt = SOAP([W, b], lr=0.1, every=2 if where != "factor-at-refresh" else 1)
    if where != "gradient-at-init":
        _run([W, b], [[G, G[:, 0]] for G in Gs], opt)  # init, t=1, t=2; next: t=3 (refresh only if every 1)
    if where.startswith("factor"):
        opt.state[W]["L0"][0, 0] = float("nan")
    before, saved = [W.detach().clone(), b.detach().clone()], _state_copy(opt)
    W.grad, b.grad = Gs[0].clone(), Gs[0][:, 0].clone()
    if where.startswith("gradient"):
        W.grad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="gradient" if where.startswith("gradient") else "factor"):
        opt.step()
    assert torch.equal(W.detach(), before[0]) and torch.equal(b.detach(), before[1])
    if where != "gradient-at-init":
        assert _same_state(opt, saved)
    else:  # a failed first step leaves no state behind
        assert not opt.state
