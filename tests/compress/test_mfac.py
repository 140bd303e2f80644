"""compress.mfac.mfac_prune: global OBS with the M-FAC inverse Fisher, checked against the dense
empirical Fisher of a tiny float64 model (window holding every example), and its contract."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.compress.mfac import mfac_prune
from curvkit.errors import ArgumentError, ModelError, NonFiniteError
from curvkit.model import layers

D64 = torch.float64


def _problem(n=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n // 2, 4, generator=g, dtype=D64), torch.randint(0, 3, (n // 2,), generator=g))
            for _ in range(2)]
    return model, data


def _dense_obs(model, data, lam, sparsity):
    """Dense OBS on the empirical Fisher of the two weights: scores, mask, one-shot update."""
    names = ["0.weight", "2.weight"]
    F = ck.fisher(model, nn.CrossEntropyLoss(), data, params=names).dense()
    Finv = torch.linalg.inv(F + lam * torch.eye(F.shape[0], dtype=D64))
    w = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    scores = w**2 / (2 * Finv.diagonal())
    k = round(sparsity * w.numel())
    pruned = torch.argsort(scores)[:k]
    u = torch.zeros_like(w)
    u[pruned] = w[pruned] / Finv.diagonal()[pruned]
    new = w - Finv @ u
    new[pruned] = 0
    return scores, pruned, new


def test_a_window_holding_every_example_reproduces_dense_obs():
    model, data = _problem()
    lam, sparsity = 1e-3, 0.4
    scores, pruned, new = _dense_obs(model, data, lam, sparsity)
    masks, infos = mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=sparsity,
                              pattern="unstructured", damping=lam, block_size=128, seed=0, progress=None,
                              max_batch=None, window=16)
    keep = torch.cat([masks["0.weight"].reshape(-1), masks["2.weight"].reshape(-1)])
    assert set(torch.nonzero(~keep).flatten().tolist()) == set(pruned.tolist())
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert torch.allclose(got, new, atol=1e-10, rtol=0)
    assert sum(i["predicted_dloss"] for i in infos) == pytest.approx(float(scores[pruned].sum()), rel=1e-10)


def test_blocked_window_is_obs_on_the_block_diagonal_fisher():
    model, data = _problem()
    lam, B = 1e-2, 7
    names = ["0.weight", "2.weight"]
    F = ck.fisher(model, nn.CrossEntropyLoss(), data, params=names).dense()
    Fb = torch.zeros_like(F)
    for s in range(0, F.shape[0], B):
        Fb[s:s + B, s:s + B] = F[s:s + B, s:s + B]
    Finv = torch.linalg.inv(Fb + lam * torch.eye(F.shape[0], dtype=D64))
    w = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    pruned = torch.argsort(w**2 / (2 * Finv.diagonal()))[:14]
    u = torch.zeros_like(w)
    u[pruned] = w[pruned] / Finv.diagonal()[pruned]
    new = w - Finv @ u
    new[pruned] = 0
    mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=14 / 28, pattern="unstructured",
               damping=lam, block_size=128, seed=0, progress=None, max_batch=None, window=12, blocks=B)
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert torch.allclose(got, new, atol=1e-10, rtol=0)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_masks_reach_the_global_sparsity_exactly_and_the_model_is_pruned_in_place(sparsity):
    model, data = _problem()
    bias = model[0].bias.detach().clone()
    masks, infos = mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=sparsity,
                              pattern="unstructured", damping="auto", block_size=128, seed=0, progress=None,
                              max_batch=None, window=8)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    for name, m in masks.items():
        p = model.get_parameter(name)
        assert m.shape == p.shape and m.dtype == torch.bool
        assert bool((p[~m] == 0).all())
    assert [i["total"] for i in infos] == [16, 12] and all(i["kept"] + round(i["sparsity"] * i["total"]) == i["total"]
                                                           for i in infos)
    assert torch.equal(model[0].bias, bias)  # biases are not pruned


def test_no_update_only_zeroes_the_pruned_weights():
    model, data = _problem()
    before = model[2].weight.detach().clone()
    masks, _ = mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=0.5, pattern="unstructured",
                          damping="auto", block_size=128, seed=0, progress=None, max_batch=None, window=8,
                          update=False)
    m = masks["2.weight"]
    assert torch.equal(model[2].weight[m], before[m]) and bool((model[2].weight[~m] == 0).all())


def test_n_m_keeps_n_of_every_m_inputs_per_row():
    model, data = _problem()
    masks, _ = mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=None, pattern="2:4",
                          damping="auto", block_size=128, seed=0, progress=None, max_batch=None, window=8)
    for m in masks.values():
        assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())


def test_bad_input_is_refused_with_what_to_do():
    model, data = _problem()
    kw = dict(damping="auto", block_size=128, seed=0, progress=None, max_batch=None)
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
            mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=bad, pattern="unstructured", **kw)
    with pytest.raises(ArgumentError, match="groups of 3"):
        mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=None, pattern="1:3", **kw)
    with pytest.raises(ArgumentError, match="fixes the sparsity"):
        mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=0.3, pattern="2:4", **kw)
    with pytest.raises(ArgumentError, match="fixes the sparsity"):
        mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity="half", pattern="2:4", **kw)
    with pytest.raises(ArgumentError, match="oba"):
        mfac_prune(model, layers(model), nn.CrossEntropyLoss(), data, sparsity=0.3, pattern="channel", **kw)
    norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(ModelError, match="linear and conv2d"):
        mfac_prune(norm, layers(norm), nn.CrossEntropyLoss(), data, sparsity=0.3, pattern="unstructured", **kw)
    x, y = data[0]
    with pytest.raises(NonFiniteError):
        mfac_prune(model, layers(model), nn.CrossEntropyLoss(), (x * float("nan"), y), sparsity=0.3,
                   pattern="unstructured", **kw)
