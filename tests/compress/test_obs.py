"""Calibration, adaptive damping, OBS/SparseGPT pruning, GPTQ, prune() and quantize()."""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit import compress
from curvkit.compress.calibration import calibrate, damped_cholesky
from curvkit.compress.obs import gptq_matrix, obs_prune_matrix
from curvkit.compress.quantizers import UniformQuantizer
from curvkit.compress.results import parse_pattern
from curvkit.errors import ArgumentError, DataError, ModelError, NonFiniteError
from curvkit.model import layers


def correlated(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype) + 0.3 * torch.eye(d, dtype=dtype)  # strongly correlated
    return torch.randn(n, d, generator=g, dtype=dtype) @ mix


def recon(W, Wp, X):
    """E(W') = 1/N ||(W - W') X^T||^2, the loss whose Hessian is H = 2/N X^T X."""
    return float(((W - Wp) @ X.T).pow(2).sum() / X.shape[0])


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: y = x W + b with W (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), Conv1D(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()


# calibration -------------------------------------------------------------------------------
def test_second_moments_equal_dense_inputs_linear_conv1d_and_conv():
    net = mlp()
    x = torch.randn(40, 8, dtype=torch.float64)
    Hs = {t.name: H for t, H in calibrate(net, layers(net)[:2], [x[:25], x[25:]], sequential=False)}
    a0 = x
    a1 = torch.tanh(net[0](x)).detach()
    assert torch.allclose(Hs["0"], 2 / 40 * a0.T @ a0, atol=1e-12)
    assert torch.allclose(Hs["2"], 2 / 40 * a1.T @ a1, atol=1e-12)
    conv = cnn()
    xc = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    targets = [t for t in layers(conv) if t.kind == "conv2d"]
    Hc = dict((t.name, H) for t, H in calibrate(conv, targets, xc))
    P = F.unfold(xc, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)
    assert torch.allclose(Hc["0"], 2 / P.shape[0] * P.T @ P, atol=1e-12)


def test_sequential_calibration_sees_the_compressed_earlier_layers():
    net = mlp()
    x = torch.randn(30, 8, dtype=torch.float64)
    seen = {}
    for layer, H in calibrate(net, layers(net), [(x, torch.zeros(30))], sequential=True):
        seen[layer.name] = H
        if layer.name == "0":
            with torch.no_grad():
                layer.module.weight.zero_()  # "compressing" the first layer changes the next one's inputs
    a1 = torch.tanh(net[0].bias).expand(30, 12)
    assert torch.allclose(seen["2"], 2 / 30 * a1.T @ a1, atol=1e-12)


def test_calibration_errors_name_the_problem():
    net = mlp()
    with pytest.raises(DataError, match="8 features"):
        compress.prune(net, data=torch.randn(10, 5, dtype=torch.float64), sparsity=0.5)
    bad = torch.randn(10, 8, dtype=torch.float64)
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="layer '0'"):
        compress.quantize(net, bad)
    with pytest.raises(DataError, match="calibration data"):
        compress.prune(net, sparsity=0.5, method="obs")


# adaptive damping ---------------------------------------------------------------------------
def test_auto_damping_grows_until_the_cholesky_factor_exists():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05], dtype=torch.float64))  # not PSD (round-off, say)
    d = damped_cholesky(H, "auto")
    mean = float(H.diagonal().mean())
    assert d.damping == pytest.approx(0.1)  # 0.01 leaves -0.05 + 0.0074 < 0
    Hd = H + 0.1 * mean * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(d.Uinv.T @ d.Uinv, torch.linalg.inv(Hd), atol=1e-12)
    ev = torch.linalg.eigvalsh(Hd)
    assert d.condition == pytest.approx(float(ev[-1] / ev[0]), rel=1e-10)
    with pytest.raises(ModelError, match="not positive definite"):
        damped_cholesky(H, 0.0)
    with pytest.raises(ArgumentError):
        damped_cholesky(H, -1.0)


def test_dead_inputs_get_zero_weights_and_a_unit_diagonal():
    X = correlated(50, 5)
    X[:, 2] = 0
    H = 2 / 50 * X.T @ X
    d = damped_cholesky(H, 0.0)
    assert d.dead.tolist() == [False, False, True, False, False]
    W = torch.randn(3, 5, dtype=torch.float64)
    Q, info = gptq_matrix(W, H, UniformQuantizer(4), damping=0.0)
    assert (Q[:, 2] == 0).all() and info["damping"] == 0.0


def test_nonfinite_hessian_is_refused():
    H = torch.eye(3, dtype=torch.float64)
    H[0, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        damped_cholesky(H, "auto", "fc")


# OBS pruning --------------------------------------------------------------------------------
def test_obs_of_one_weight_is_the_closed_form():
    X = correlated(60, 6, seed=1)
    H = 2 / 60 * X.T @ X
    W = torch.tensor([[1e-3, 0.9, -1.1, 0.7, 1.3, -0.8]], dtype=torch.float64)
    Wp, keep, info = obs_prune_matrix(W, H, sparsity=1 / 6, pattern=parse_pattern("unstructured"), damping=0.0)
    Hi = torch.linalg.inv(H)
    expect = W - W[0, 0] * Hi[0] / Hi[0, 0]
    assert keep.tolist() == [[False] + [True] * 5]
    assert torch.allclose(Wp, expect, atol=1e-12, rtol=0)
    assert info["error"] == pytest.approx(float(W[0, 0] ** 2 / (2 * Hi[0, 0])), rel=1e-10)
    assert info["error"] == pytest.approx(recon(W, Wp, X), rel=1e-10)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.75), ("2:4", None)])
def test_obs_beats_magnitude_and_predicts_its_own_error(pattern, sparsity):
    X = correlated(200, 16, seed=2)
    H = 2 / 200 * X.T @ X
    W = torch.randn(10, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pat = parse_pattern(pattern)
    sp = pat.sparsity if sparsity is None else sparsity
    Wp, keep, info = obs_prune_matrix(W, H, sparsity=sp, pattern=pat, damping="auto", block_size=8)
    assert (Wp[~keep] == 0).all() and info["damping"] == 0.01
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    D = W - Wp
    assert info["error_damped"] == pytest.approx(float((D @ Hd * D).sum() / 2), rel=1e-9)  # the sweep's sum is exact
    assert info["error"] == pytest.approx(recon(W, Wp, X), rel=1e-9)  # what the layer outputs, computed directly
    assert info["error"] < info["error_damped"]
    if pat.kind == "n:m":
        assert (keep.reshape(10, 4, 4).sum(-1) == 2).all()
        mag = torch.ones_like(keep).reshape(10, 4, 4).scatter_(
            -1, W.abs().reshape(10, 4, 4).topk(2, -1, largest=False).indices, False).reshape(10, 16)
    else:
        assert int((~keep).sum()) == round(sp * W.numel())
        mag = W.abs() > W.abs().reshape(-1).kthvalue(round(sp * W.numel())).values
    assert recon(W, Wp, X) < recon(W, W * mag, X)


# GPTQ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(group_size):
    W = torch.randn(5, 12, dtype=torch.float64)
    H = torch.diag(torch.rand(12, dtype=torch.float64) + 0.5)
    q = UniformQuantizer(3, group_size=group_size)
    Q, _ = gptq_matrix(W, H, q, damping=0.0, block_size=5)
    assert torch.equal(Q, q(W))


@pytest.mark.parametrize("bits,group_size,act_order", [(4, None, False), (3, None, True), (3, 8, False)])
def test_gptq_beats_round_to_nearest(bits, group_size, act_order):
    X = correlated(300, 24, seed=4)
    H = 2 / 300 * X.T @ X
    W = torch.randn(12, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = UniformQuantizer(bits, group_size=group_size)
    Q, info = gptq_matrix(W, H, q, damping=0.0, block_size=7, act_order=act_order)
    assert info["error"] == pytest.approx(recon(W, Q, X), rel=1e-9)
    assert info["error_damped"] == pytest.approx(info["error"], rel=1e-9)  # no damping: the sweep's sum is exact
    assert recon(W, Q, X) < recon(W, q(W), X)
    Qa, _ = gptq_matrix(W, H, q, block_size=7, act_order=act_order)  # the default damping
    assert recon(W, Qa, X) < recon(W, q(W), X)
    for r in range(12):  # every weight is on its row's grid: at most 2^bits levels per row (and group)
        for g in range(0, 24, group_size or 24):
            assert Q[r, g:g + (group_size or 24)].unique().numel() <= 2 ** bits


# prune() ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_prune_copies_folds_masks_and_reloads(method, tmp_path):
    net = mlp()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(64, 8, dtype=torch.float64)
    res = compress.prune(net, None, [(x, torch.zeros(64))], sparsity=0.5, method=method)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # caller's model untouched
    assert res.sparsity == pytest.approx(0.5) and len(res.layers) == 3
    assert res.masks["2.weight"].shape == net[2].weight.shape  # the transposed layer's own shape
    for name, p in res.model.named_parameters():
        if name in res.masks:
            assert (p[~res.masks[name]] == 0).all() and res.masks[name].float().mean() == 0.5
    fresh = mlp(seed=1)
    fresh.load_state_dict(compress.load_state_dict(res.save(tmp_path / "p.pt")[0]))
    assert torch.allclose(fresh(x), res.model(x))
    res2 = compress.prune(net, data=x, sparsity=0.5, method=method, inplace=True)
    assert res2.model is net and (net[0].weight == 0).float().mean() == 0.5


def test_obs_prune_of_a_network_beats_magnitude_on_its_outputs():
    net = cnn()
    x = torch.randn(32, 2, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        errs = {m: float((compress.prune(net, data=x, sparsity=0.6, method=m).model(x) - ref).pow(2).mean())
                for m in ("obs", "magnitude")}
    assert errs["obs"] < errs["magnitude"]


def test_prune_scopes_and_n_m():
    net = mlp()
    x = torch.randn(32, 8, dtype=torch.float64)
    glob = compress.prune(net, sparsity=0.5, method="magnitude", scope="global")
    assert glob.sparsity == pytest.approx(0.5) and len({round(i["sparsity"], 3) for i in glob.layers}) > 1
    nm = compress.prune(net, data=x, method="obs", pattern="2:4")
    assert nm.pattern == "2:4" and nm.sparsity == pytest.approx(0.5)
    w = nm.model[0].weight.reshape(12, 2, 4)
    assert ((w != 0).sum(-1) <= 2).all()


def test_prune_refuses_bad_arguments():
    net = mlp()
    x = torch.randn(16, 8, dtype=torch.float64)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
            compress.prune(net, data=x, sparsity=bad)
    with pytest.raises(ArgumentError, match="fixes the sparsity"):
        compress.prune(net, data=x, sparsity=0.3, pattern="2:4")
    with pytest.raises(ArgumentError, match="layer '4'.*8 inputs"):
        compress.prune(net, data=x, pattern="3:16", params="4.weight")
    with pytest.raises(ArgumentError, match="unknown method"):
        compress.prune(net, data=x, sparsity=0.5, method="sparsegpt")
    with pytest.raises(ArgumentError, match="structured"):
        compress.prune(net, data=x, sparsity=0.5, method="oba")
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="Embedding.*supports linear"):
        compress.prune(emb, data=torch.arange(10)[:, None], sparsity=0.5, params="0.weight")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ModelError, match="grouped"):
        compress.prune(grouped, data=torch.randn(2, 4, 5, 5), sparsity=0.5, params="0.weight")


def test_prune_dispatches_mfac_and_structured_lazily(monkeypatch):
    calls = {}

    def mfac_prune(model, targets, loss_fn, data, *, sparsity, pattern, damping, block_size, seed, progress,
                   max_batch, window):
        calls["mfac"] = (sparsity, str(pattern), window, [t.name for t in targets])
        return {}, [{"name": t.name, "shape": (1, 1), "kept": 1, "total": 2, "sparsity": 0.5} for t in targets]

    def prune_structured(model, loss_fn, data, *, sparsity, pattern, method, params, scope, curvature, steps, seed,
                         progress, max_batch, max_matvecs, inplace):
        calls["structured"] = (sparsity, str(pattern), method, max_matvecs, scope, curvature, steps, inplace)
        return compress.PruneResult(model, method, str(pattern), sparsity)

    monkeypatch.setitem(sys.modules, "curvkit.compress.mfac", types.SimpleNamespace(mfac_prune=mfac_prune))
    monkeypatch.setitem(sys.modules, "curvkit.compress.structured",
                        types.SimpleNamespace(prune_structured=prune_structured))
    net = mlp()
    data = [(torch.randn(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.long))]
    res = compress.prune(net, nn.CrossEntropyLoss(), data, sparsity=0.3, method="mfac", window=16)
    assert calls["mfac"] == (0.3, "unstructured", 16, ["0", "2", "4"]) and res.sparsity == 0.5
    res = compress.prune(net, nn.CrossEntropyLoss(), data, sparsity=0.25, method="oba", pattern="channel",
                         max_matvecs=7, steps=3, scope="global", curvature="ggn")
    # the copy is made once, in prune(): the structured pruner works on it in place
    assert calls["structured"] == (0.25, "channel", "oba", 7, "global", "ggn", 3, True) and res.model is not net
    with pytest.raises(ArgumentError, match="global"):
        compress.prune(net, nn.CrossEntropyLoss(), data, sparsity=0.3, method="mfac", scope="layer")


# quantize() ---------------------------------------------------------------------------------
def test_quantize_gptq_beats_rtn_and_reports_per_layer(tmp_path):
    net = mlp()
    x = correlated(256, 8, seed=7)
    ref = net(x).detach()
    out = {}
    for method in ("gptq", "rtn"):
        res = compress.quantize(net, x if method == "gptq" else None, bits=4, method=method)
        out[method] = float((res.model(x).detach() - ref).pow(2).mean())
        assert [layer["name"] for layer in res.layers] == ["0", "2", "4"]
    assert out["gptq"] < out["rtn"]
    assert all(0.01 <= layer["damping"] <= 100 and layer["condition"] >= 1 for layer in res.layers if
               layer["damping"] is not None) or res.method == "rtn"
    g = compress.quantize(net, [x[:100], x[100:]], bits=4, group_size=4, act_order=True)
    assert g.layers[0]["damping"] == pytest.approx(0.01) and g.layers[0]["condition"] > 1
    assert g.bits == 4 and g.size < g.original_size
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), mlp().parameters()))  # caller untouched
    fresh = mlp(seed=3)
    fresh.load_state_dict(compress.load_state_dict(g.save(tmp_path / "q.pt")))
    assert torch.allclose(fresh(x), g.model(x))
    assert g.to_dict()["layers"][0]["name"] == "0"


def test_quantize_refuses_bad_arguments():
    net = mlp()
    with pytest.raises(DataError, match="rtn"):
        compress.quantize(net, None, method="gptq")
    with pytest.raises(ArgumentError, match="bits"):
        compress.quantize(net, None, bits=1, method="rtn")
    with pytest.raises(ArgumentError, match="unknown method"):
        compress.quantize(net, None, method="awq")


def test_a_frozen_inference_model_is_compressed_by_default():
    """requires_grad=False everywhere (a model loaded for inference): the data-only methods need no
    gradients, so params=None still chooses every linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).requires_grad_(False)
    x = torch.randn(64, 8)
    q = compress.quantize(model, x, bits=3)
    assert [row["name"] for row in q.layers] == ["0", "2"]
    p = compress.prune(model, data=x, sparsity=0.5, method="obs")
    assert p.sparsity == pytest.approx(0.5) and not torch.equal(p.model[0].weight, model[0].weight)


def test_damping_scales_with_the_live_inputs_only():
    """Dead inputs (always 0) must not set the damping's scale: with inputs ~1e-3, a mean over a
    diagonal that includes the dead ones' unit entries would add ~1e3 times too much."""
    from curvkit.compress.calibration import damped_cholesky

    X = 1e-3 * correlated(100, 6, seed=7)
    X[:, 4:] = 0  # two dead inputs
    H = 2 / 100 * X.T @ X
    d = damped_cholesky(H, 0.01, "layer")
    live = H.diagonal()[:4].mean()
    assert d.added == pytest.approx(float(0.01 * live), rel=1e-12)
