"""Muon: the orthogonalised update against a float64 reference, the functional muon_update, the
split between Muon and AdamW (by the layer registry, GPT-2's Conv1D included), AdamW bit for bit
against torch's, and NaN safety. The contract shared with every optimizer (resume, bf16, devices,
hyperparameter checks) is in test_contract.py."""

import copy

import pytest
import torch
from torch import nn

from curvkit.errors import ArgumentError, NonFiniteError
from curvkit.optim import Muon, muon_update

from .test_kfac import Conv1D

D = torch.float64


def _ns_reference(G, steps=5):
    """Newton-Schulz written out per matrix, independently of curvkit's batched code."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (torch.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("nesterov,scale", [(True, "keller"), (False, "moonshot")])
def test_update_equals_newton_schulz_of_momentum_in_float64(nesterov, scale):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 8), (5, 8), (8, 5), (4, 3, 2, 2)]  # two of one shape (batched), tall, conv
    params = [torch.randn(s, generator=gen, dtype=D, requires_grad=True) for s in shapes]
    lr, mom, wd = 0.05, 0.9, 0.1
    opt = Muon(params, lr=lr, momentum=mom, nesterov=nesterov, weight_decay=wd, scale=scale)
    bufs = [torch.zeros(p.shape[0], p[0].numel(), dtype=D) for p in params]
    for _ in range(3):
        _set_grads(params, gen)
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, p in enumerate(params):
            g = p.grad.reshape(p.shape[0], -1)
            bufs[i] = mom * bufs[i] + g
            u = g + mom * bufs[i] if nesterov else bufs[i]
            m, n = u.shape
            s = max(1, m / n) ** 0.5 if scale == "keller" else 0.2 * max(m, n) ** 0.5
            applied = ((before[i] * (1 - lr * wd) - p.detach()) / (lr * s)).reshape(m, n)
            torch.testing.assert_close(applied, _ns_reference(u), rtol=0, atol=1e-12)
            # the direction keeps u's singular vectors and squeezes its singular values near 1
            U, S, Vh = torch.linalg.svd(u, full_matrices=False)
            core = U.T @ applied @ Vh.T
            torch.testing.assert_close(core, torch.diag(core.diagonal()), rtol=0, atol=1e-12)
            assert core.diagonal().min() > 0.6 and core.diagonal().max() < 1.25
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[i].reshape(p.shape), rtol=0, atol=0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 4, 3)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, t):  # t: (B, 4) token ids
        h = self.conv(self.emb(t).transpose(1, 2)).flatten(1)
        return self.head(self.norm(torch.tanh(self.hidden(h))))


def _names(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]


def test_a_model_is_split_into_muon_and_adamw():
    model = _Net()
    opt = Muon(model)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    muon, adamw = _names(opt, model)
    assert muon == ["conv.weight", "hidden.weight"]
    assert adamw == ["conv.bias", "emb.weight", "head.bias", "head.weight", "hidden.bias", "norm.bias",
                     "norm.weight"]
    muon, adamw = _names(Muon(model, adamw_params=r"^(emb|conv)\."), model)
    assert muon == ["head.weight", "hidden.weight"] and "conv.weight" in adamw and "emb.weight" in adamw
    muon, adamw = _names(Muon(model, adamw_params=["hidden.weight", model.head.weight]), model)
    assert muon == ["conv.weight", "emb.weight"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_model_trains_with_every_kind_of_parameter(seed):
    torch.manual_seed(seed)  # the initial weights: the run must not depend on earlier tests' draws
    model = _Net().double()
    opt = Muon(model, lr=0.02, adamw_lr=0.01)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (64, 4), generator=gen)
    y = t[:, 0]
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(t), y)
        loss.backward()
        losses.append(opt.step(lambda: loss).item())  # torch's closure convention: returns its loss
    assert losses[-1] < 0.5 * losses[0]
    assert set(opt.state[model.conv.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert model.frozen.weight not in opt.state


def test_parameters_and_groups_are_split_by_dimension_unless_a_group_says():
    w, v, b = (torch.zeros(4, 3, requires_grad=True), torch.zeros(3, 4, requires_grad=True),
               torch.zeros(4, requires_grad=True))
    opt = Muon([{"params": [w, b]}, {"params": [v], "use_muon": False, "adamw_lr": 0.1}])
    # the first group is split in two; an AdamW group's lr is adamw_lr (the group's or the default)
    assert [(g["use_muon"], g["lr"]) for g in opt.param_groups] == [(True, 0.02), (False, 3e-4), (False, 0.1)]
    for p in (w, v, b):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[w]) == {"momentum_buffer"}
    assert set(opt.state[b]) == set(opt.state[v]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(v.detach(), torch.full((3, 4), -0.1))  # Adam's first step: lr * sign
    with pytest.raises(ArgumentError, match="fewer than 2"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "use_muon": True})
    assert len(opt.param_groups) == 3  # the refused group was not kept
    with pytest.raises(ArgumentError, match="needs the model"):
        Muon([w], adamw_params="head")


def test_an_lr_scheduler_scales_both_parts():
    w, b = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = Muon([w, b], lr=0.02, adamw_lr=0.001)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    sched.step()
    torch.testing.assert_close([g["lr"] for g in opt.param_groups], [0.01, 0.0005])


@pytest.mark.parametrize("foreach", [True, None])
def test_adamw_part_equals_torch_adamw(foreach):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 4), ()]
    kw = dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ours = [torch.randn(s, generator=gen, dtype=D, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = Muon([{"params": ours, "use_muon": False}], adamw_lr=kw["lr"], adamw_betas=kw["betas"],
               adamw_eps=kw["eps"], adamw_weight_decay=kw["weight_decay"])
    ref = torch.optim.AdamW(theirs, foreach=foreach, **kw)
    for _ in range(5):
        _set_grads(ours, gen)
        for a, b in zip(ours, theirs):
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        if foreach:  # the same foreach arithmetic: bit for bit
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_bad_adamw_params_are_refused():
    model = _Net()
    with pytest.raises(ArgumentError, match="regular expression"):
        Muon(model, adamw_params="(")
    with pytest.raises(ArgumentError, match="nope"):
        Muon(model, adamw_params=["nope"])


@pytest.mark.parametrize("where", ["muon", "adamw"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_neither_parameters_nor_state(where, bad):
    model = _Net().double()
    opt = Muon(model, weight_decay=0.1, adamw_weight_decay=0.1)
    t = torch.randint(0, 10, (16, 4), generator=torch.Generator().manual_seed(0))
    for first in (True, False):
        if not first:  # once on a fresh optimizer, once with state
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(t), t[:, 0]).backward()
                opt.step()
        params = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict())
        opt.zero_grad()
        nn.functional.cross_entropy(model(t), t[:, 0]).backward()
        target = model.hidden.weight if where == "muon" else model.norm.bias
        target.grad[0, ...] = bad
        with pytest.raises(NonFiniteError, match="gradient.*not changed"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        after = opt.state_dict()
        assert after["state"].keys() == state["state"].keys()
        for k, st in state["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][n])) for n, v in st.items())


def test_model_split_resumes_bit_exactly():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (16, 4), generator=gen)

    def run(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(t), t[:, 0]).backward()
            opt.step()

    torch.manual_seed(0)
    ref = _Net()
    run(ref, Muon(ref, weight_decay=0.01), 6)
    torch.manual_seed(0)
    model = _Net()
    opt = Muon(model, weight_decay=0.01)
    run(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    opt = Muon(model, weight_decay=0.01)
    opt.load_state_dict(sd)
    run(model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


def test_muon_update_is_the_step_of_the_class():
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 8), (5, 8), (8, 5), (4, 3, 2, 2)]
    ours = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
    theirs = [p.clone().requires_grad_() for p in ours]
    bufs = [torch.zeros_like(p) for p in ours]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, ns_steps=5, weight_decay=0.1, scale="moonshot")
    opt = Muon(theirs, **kw)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen, dtype=D) for s in shapes]
        muon_update(ours, grads, bufs, **kw)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(bufs, theirs))  # in place


class _GPT(nn.Module):
    """GPT-2's layout: an embedding, Conv1D blocks (weights stored (in, out)), a Linear head."""

    def __init__(self, head_conv1d=False):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.c_fc, self.c_proj = Conv1D(16, 8), Conv1D(8, 16)
        self.head = Conv1D(11, 8) if head_conv1d else nn.Linear(8, 11, bias=False)

    def forward(self, t):
        h = self.wte(t)
        return self.head(h + self.c_proj(torch.tanh(self.c_fc(h))))


@pytest.mark.parametrize("head_conv1d", [False, True])
def test_gpt2_style_model_is_split_by_the_layer_registry(head_conv1d):
    torch.manual_seed(0)
    model = _GPT(head_conv1d)
    muon, adamw = _names(Muon(model), model)
    assert muon == ["c_fc.weight", "c_proj.weight"]
    assert "wte.weight" in adamw and "head.weight" in adamw


def test_a_weight_stored_in_by_out_is_scaled_as_out_by_in():
    torch.manual_seed(0)
    model = _GPT().double()
    lr = 0.1
    opt = Muon(model, lr=lr, momentum=0.0, nesterov=False)
    t = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    W = model.c_fc.weight  # (in=8, out=16): keller's scale is max(1, 16/8)^0.5 on the (out, in) matrix
    before = W.detach().clone()
    nn.functional.cross_entropy(model(t).reshape(-1, 11), t.reshape(-1)).backward()
    opt.step()
    applied = (before - W.detach()) / lr
    torch.testing.assert_close(applied, 2**0.5 * _ns_reference(W.grad.T).T, rtol=0, atol=1e-12)
