"""Shampoo against dense float64 references: the inverse-root update, grafting, blocking, the
Newton root, param groups, validation and the NaN guard."""


import pytest
import torch
from torch import nn

from curvkit.errors import NonFiniteError
from curvkit.optim import Shampoo

D = torch.float64


def _root(A, eps):
    w, Q = torch.linalg.eigh(A)
    return Q @ torch.diag((w.clamp_min(0) + eps) ** -0.25) @ Q.T


def _grads(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=D) for _ in range(n)]


def _run(params, grads, opt):
    """Feed fixed gradients: grads[t][i] for params[i] at step t."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_update_is_the_dense_inverse_fourth_root_update():
    eps, b2, lr = 1e-8, 0.7, 0.5
    G1, G2 = _grads((5, 4), 2)
    W0 = torch.randn(5, 4, dtype=D)
    W = nn.Parameter(W0.clone())
    opt = Shampoo([W], lr=lr, betas=(0.0, b2), epsilon=eps, every=1, graft="none")
    _run([W], [[G1]], opt)
    U1 = _root(G1 @ G1.T, eps) @ G1 @ _root(G1.T @ G1, eps)
    assert torch.allclose(W.detach(), W0 - lr * U1, atol=1e-10, rtol=0)
    _run([W], [[G2]], opt)
    c = 1 - b2**2  # bias correction of the EMA
    L = (b2 * (1 - b2) * G1 @ G1.T + (1 - b2) * G2 @ G2.T) / c
    R = (b2 * (1 - b2) * G1.T @ G1 + (1 - b2) * G2.T @ G2) / c
    U2 = _root(L, eps) @ G2 @ _root(R, eps)
    assert torch.allclose(W.detach(), W0 - lr * (U1 + U2), atol=1e-10, rtol=0)


def test_roots_are_reused_between_refreshes_and_adam_comes_first():
    eps, (b1, b2), lr = 1e-8, (0.9, 0.8), 0.1
    Gs = _grads((3, 4), 4, seed=1)
    W = nn.Parameter(torch.zeros(3, 4, dtype=D))
    Wa = nn.Parameter(torch.zeros(3, 4, dtype=D))
    opt = Shampoo([W], lr=lr, betas=(b1, b2), epsilon=eps, every=2, graft="none")
    adam = torch.optim.Adam([Wa], lr=lr, betas=(b1, b2), eps=1e-8)
    _run([W], [[Gs[0]]], opt)
    _run([Wa], [[Gs[0]]], adam)  # step 1 < start_preconditioning_step = every = 2: Adam
    assert torch.allclose(W.detach(), Wa.detach(), atol=1e-12, rtol=0)
    L, R, m, W_ref = torch.zeros(3, 3, dtype=D), torch.zeros(4, 4, dtype=D), torch.zeros(3, 4, dtype=D), W.detach().clone()
    L, R = (1 - b2) * Gs[0] @ Gs[0].T, (1 - b2) * Gs[0].T @ Gs[0]
    m = (1 - b1) * Gs[0]
    for t, G in enumerate(Gs[1:], start=2):
        L, R, m = b2 * L + (1 - b2) * G @ G.T, b2 * R + (1 - b2) * G.T @ G, b1 * m + (1 - b1) * G
        if t % 2 == 0:  # refresh at 2 and 4, step 3 reuses step 2's roots
            Lr, Rr = _root(L / (1 - b2**t), eps), _root(R / (1 - b2**t), eps)
        W_ref -= lr * Lr @ (m / (1 - b1**t)) @ Rr
        _run([W], [[G]], opt)
        assert torch.allclose(W.detach(), W_ref, atol=1e-10, rtol=0)


def test_grafted_step_has_adams_norm_and_shampoos_direction():
    eps, (b1, b2), lr = 1e-8, (0.9, 0.99), 0.1
    Gs = _grads((4, 6), 3, seed=2)
    W = nn.Parameter(torch.zeros(4, 6, dtype=D))
    opt = Shampoo([W], lr=lr, betas=(b1, b2), epsilon=eps, every=1, graft="adam")
    m, v, L, R = 0, 0, 0, 0
    for t, G in enumerate(Gs, start=1):
        before = W.detach().clone()
        _run([W], [[G]], opt)
        m, v = b1 * m + (1 - b1) * G, b2 * v + (1 - b2) * G**2
        L, R = b2 * L + (1 - b2) * G @ G.T, b2 * R + (1 - b2) * G.T @ G
        adam = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
        shampoo = _root(L / (1 - b2**t), eps) @ m @ _root(R / (1 - b2**t), eps)
        step = (before - W.detach()) / lr
        assert torch.allclose(step.norm(), adam.norm(), rtol=1e-12)
        assert torch.allclose(step, shampoo * adam.norm() / shampoo.norm(), atol=1e-12, rtol=0)


def test_blocks_of_a_large_parameter_are_independent_parameters():
    Gs = _grads((7, 5), 4, seed=3)
    blocks = [(slice(r, r + 3), slice(c, c + 3)) for r in (0, 3, 6) for c in (0, 3)]
    W0 = torch.randn(7, 5, dtype=D)
    W = nn.Parameter(W0.clone())
    parts = [nn.Parameter(W0[b].clone()) for b in blocks]
    kw = dict(lr=0.05, betas=(0.9, 0.95), every=2, weight_decay=0.1)
    _run([W], [[G] for G in Gs], Shampoo([W], block_size=3, **kw))
    _run(parts, [[G[b] for b in blocks] for G in Gs], Shampoo(parts, block_size=3, **kw))
    for b, p in zip(blocks, parts):
        assert torch.allclose(W.detach()[b], p.detach(), atol=1e-12, rtol=0)
    assert max(W.detach()[b].shape for b in blocks) == (3, 3)


def test_conv_kernel_is_its_out_by_rest_matrix():
    Gs = _grads((4, 2, 3, 3), 3, seed=4)
    K = nn.Parameter(torch.randn(4, 2, 3, 3, dtype=D))
    M = nn.Parameter(K.detach().reshape(4, 18).clone())
    kw = dict(lr=0.05, every=1)
    _run([K], [[G] for G in Gs], Shampoo([K], **kw))
    _run([M], [[G.reshape(4, 18)] for G in Gs], Shampoo([M], **kw))
    assert torch.allclose(K.detach().reshape(4, 18), M.detach(), atol=1e-12, rtol=0)


def test_newton_roots_match_eigh_roots():
    Gs = _grads((6, 4), 3, seed=5)
    ws = []
    for method in ("eigh", "newton"):
        W = nn.Parameter(torch.zeros(6, 4, dtype=D))
        _run([W], [[G] for G in Gs], Shampoo([W], lr=0.1, epsilon=1e-3, every=1, graft="none",
                                               root_method=method))
        ws.append(W.detach())
    assert torch.allclose(ws[0], ws[1], atol=1e-7, rtol=1e-7)


def test_param_groups_use_their_own_lr_and_weight_decay():
    Gs = _grads((3, 4), 3, seed=6)
    a0, b0 = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    a, b = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
    opt = Shampoo([{"params": [a]}, {"params": [b], "lr": 0.3, "weight_decay": 0.5}], lr=0.01, every=1)
    _run([a, b], [[G, 2 * G] for G in Gs], opt)
    a1, b1 = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
    _run([a1], [[G] for G in Gs], Shampoo([a1], lr=0.01, every=1))
    _run([b1], [[2 * G] for G in Gs], Shampoo([b1], lr=0.3, weight_decay=0.5, every=1))
    assert torch.equal(a.detach(), a1.detach()) and torch.equal(b.detach(), b1.detach())


def test_vectors_get_adam():
    Gs = _grads((5,), 3, seed=7)
    w, wa = nn.Parameter(torch.ones(5, dtype=D)), nn.Parameter(torch.ones(5, dtype=D))
    _run([w], [[G] for G in Gs], Shampoo([w], lr=0.1, every=1))
    _run([wa], [[G] for G in Gs], torch.optim.Adam([wa], lr=0.1, betas=(0.9, 0.999), eps=1e-8))
    assert torch.allclose(w.detach(), wa.detach(), atol=1e-12, rtol=0)


def _state_copy(opt):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()}


def _same_state(opt, saved):
    return all(set(st) == set(saved[id(p)]) and all(
        torch.allclose(v, saved[id(p)][k], rtol=0, atol=0, equal_nan=True) if torch.is_tensor(v) else v == saved[id(p)][k] for k, v in st.items())
        for p, st in opt.state.items())


@pytest.mark.parametrize("where", ["gradient", "factor", "factor-at-refresh"])
def test_nan_leaves_parameters_and_state_unchanged(where):
    Gs = _grads((4, 3), 3, seed=8)
    W, b = nn.Parameter(torch.randn(4, 3, dtype=D)), nn.Parameter(torch.randn(4, dtype=D))
    opt = Shampoo([W, b], lr=0.1, every=2 if where != "factor-at-refresh" else 1)
    _run([W, b], [[G, G[:, 0]] for G in Gs], opt)  # 3 steps: roots at 2 (not at 4 unless every=1)
    if where != "gradient":
        opt.state[W]["L0"][0, 0] = float("nan")
    before, saved = [W.detach().clone(), b.detach().clone()], _state_copy(opt)
    W.grad, b.grad = Gs[0].clone(), Gs[0][:, 0].clone()
    if where == "gradient":
        W.grad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="gradient" if where == "gradient" else "factor"):
        opt.step()
    assert torch.equal(W.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert _same_state(opt, saved)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_rank_deficient_factors_precondition_with_the_default_epsilon(method):
    # a 16x3 weight: its 16x16 factor has rank <= 3, round-off makes it slightly indefinite
    W = torch.randn(16, 3, requires_grad=True, generator=torch.Generator().manual_seed(0))
    opt = Shampoo([W], every=1, root_method=method)
    for k in range(3):
        W.grad = torch.randn(16, 3, generator=torch.Generator().manual_seed(k + 1))
        opt.step()
    assert torch.isfinite(W).all() and "Lroot0" in opt.state[W]


def test_a_later_start_set_mid_run_computes_the_missing_roots():
    W = torch.randn(5, 4, requires_grad=True, generator=torch.Generator().manual_seed(0))
    opt = Shampoo([W], every=10)  # roots first at step 10
    W.grad = torch.randn(5, 4)
    opt.step()
    opt.param_groups[0]["start_preconditioning_step"] = 2  # now due at a step that is not a refresh
    opt.param_groups[0]["every"] = 7
    for _ in range(3):
        W.grad = torch.randn(5, 4)
        opt.step()
    assert "Lroot0" in opt.state[W] and torch.isfinite(W).all()
