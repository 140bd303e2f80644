"""Structured pruning (compress.structured) and Optimal Brain Apoptosis (compress.oba): groups,
shrinking equals masking, the checkpoint round trip, exact OBA against the dense Hessian, the
randomized estimate against its standard error."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvkit.compress.oba import oba_scores
from curvkit.compress.results import PruneResult
from curvkit.compress.structured import (apply_structure, find_groups, group_indices, prune_structured,
                                         structure_of, zero_groups)
from curvkit.errors import ArgumentError, ModelError


class Attention(nn.Module):
    """Attention written out (fused qkv, proj) with a residual MLP, as the char-LM's block."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, d))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        B, T, D = x.shape
        hd = self.qkv.out_features // (3 * self.heads)
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, self.heads * hd))
        x = x + self.mlp(x)
        return self.out(x).mean(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)).double()


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2.0)
    m[1].weight.data.normal_()
    m[1].bias.data.normal_()
    return m.eval()


def attention():
    torch.manual_seed(0)
    return Attention().double()


CASES = {
    "mlp": (mlp, "neuron", lambda: (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))),
    "cnn": (cnn, "channel", lambda: (torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (12,)))),
    "heads": (attention, "head", lambda: (torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))),
    "attn-mlp": (attention, "neuron", lambda: (torch.randn(6, 5, 8, dtype=torch.float64),
                                                torch.randint(0, 3, (6,)))),
}


def test_groups_found():
    assert [(s.name, s.units) for s in find_groups(mlp(), "neuron")] == [("0", 5), ("2", 4)]
    sets = find_groups(cnn(), "channel")
    assert [(s.name, s.units) for s in sets] == [("0", 3), ("3", 4)]
    assert [c.module for c in sets[0].cuts] == ["0", "1", "3"]  # conv, its BatchNorm, the consumer conv
    assert (sets[1].cuts[-1].module, sets[1].cuts[-1].width) == ("7", 4)  # through Flatten: 2x2 columns each
    # the residual-stream layers (proj, mlp.2, out) are not neuron groups; only the MLP hidden units are
    assert [(s.name, s.units) for s in find_groups(attention(), "neuron")] == [("mlp.0", 6)]
    assert [(s.name, s.units) for s in find_groups(attention(), "head")] == [("qkv", 2)]
    assert [s.name for s in find_groups(mlp(), "neuron", params="2")] == ["2"]


@pytest.mark.parametrize("case", CASES)
def test_shrinking_equals_zeroing(case):
    build, kind, data = CASES[case]
    model, (x, _) = build(), data()
    sets = find_groups(model, kind)
    removed = {s.name: list(range(0, s.units, 2))[: s.units - 1] for s in sets}
    masked = zero_groups(copy.deepcopy(model), sets, removed)
    small = apply_structure(copy.deepcopy(model), structure_of(model, sets, removed))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(small(x), masked(x), rtol=0, atol=1e-12)
    assert not torch.allclose(small(x), model(x))


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip(case, tmp_path):
    build, kind, data = CASES[case]
    model, batch = build(), data()
    before = copy.deepcopy(model.state_dict())
    res = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=0.5, pattern=kind, method="oba")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    paths = res.save(tmp_path / "pruned.pt")
    torch.manual_seed(123)
    fresh = type(model)() if case != "mlp" and case != "cnn" else build()
    if case in ("mlp", "cnn"):  # a fresh instance with other weights
        for p in fresh.parameters():
            p.data.normal_()
    fresh = fresh.double()
    import json

    structure = json.loads(paths[1].read_text())
    rebuilt = PruneResult(model=fresh, method="oba", pattern=kind, sparsity=0.5, structure=structure).rebuild(fresh)
    rebuilt.load_state_dict(torch.load(paths[0], weights_only=True), strict=True)
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(batch[0]), res.model(batch[0]), rtol=0, atol=0)
    assert res.sparsity > 0 and all(layer["kept"] >= 1 for layer in res.layers)


def _flat_loss(model, loss_fn, names, x, y):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(t):
        parts = {n: c.reshape(s) for n, c, s in zip(names, t.split(sizes), shapes)}
        return loss_fn(functional_call(model, parts, (x,)), y)

    return f, theta


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_oba_equals_dense_taylor(case, curvature):
    build, kind, data = CASES[case]
    model, (x, y) = build(), data()
    loss_fn = nn.CrossEntropyLoss()
    sets = find_groups(model, kind)
    res = oba_scores(model, loss_fn, (x, y), sets, curvature=curvature)
    names = [n for n, _ in model.named_parameters() if any(n == p for s in sets for p, _, _ in s.members(model))]
    f, theta = _flat_loss(model, loss_fn, names, x, y)
    g = torch.autograd.functional.jacobian(f, theta)
    if curvature == "hessian":
        H = torch.autograd.functional.hessian(f, theta)
    else:  # J^T H_out J with the output Hessian of the mean cross-entropy
        params = dict(model.named_parameters())
        sizes, shapes = [params[n].numel() for n in names], [params[n].shape for n in names]

        def out_fn(t):
            return functional_call(model, {n: c.reshape(s) for n, c, s in zip(names, t.split(sizes), shapes)}, (x,))

        J = torch.autograd.functional.jacobian(out_fn, theta).reshape(-1, theta.numel())
        out = out_fn(theta).detach()
        Hout = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
        H = J.T @ Hout @ J
    want = []
    for idx in group_indices(model, sets, names):
        d = torch.zeros_like(theta)
        d[idx] = -theta[idx]
        want.append(g @ d + 0.5 * d @ H @ d)
    torch.testing.assert_close(torch.cat(res.scores), torch.stack(want), rtol=0, atol=1e-10)
    assert res.exact and res.matvecs == sum(s.units for s in sets)


def test_oba_is_the_loss_change_of_a_quadratic_model():
    # with the first layer frozen, an MSE loss is quadratic in the trained layers: the Taylor
    # expansion is exact, and removing a unit (its consumer column) changes the loss by its score
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].requires_grad_(False)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    sets = find_groups(model, "neuron", params=["0.weight", "0.bias"])
    res = oba_scores(model, loss_fn, (x, y), sets)
    base = float(loss_fn(model(x), y).detach())
    for u in range(sets[0].units):
        small = apply_structure(copy.deepcopy(model), structure_of(model, sets, {"0": [u]}))
        assert abs((float(loss_fn(small(x), y).detach()) - base) - float(res.scores[0][u])) < 1e-10


def test_randomized_oba_within_its_stderr():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    sets = find_groups(model, "neuron")  # 22 groups, overlapping in layer 2
    exact = torch.cat(oba_scores(model, nn.CrossEntropyLoss(), batch, sets).scores)
    few = oba_scores(model, nn.CrossEntropyLoss(), batch, sets, max_matvecs=5, seed=3)
    more = oba_scores(model, nn.CrossEntropyLoss(), batch, sets, max_matvecs=20, seed=4)
    assert not few.exact and few.matvecs == 5 and more.matvecs == 20
    for est in (few, more):
        err, se = (torch.cat(est.scores) - exact).abs(), torch.cat(est.stderr)
        assert (se > 0).all() and (err < 4 * se).all(), (err, se)
    assert torch.cat(more.stderr).mean() < torch.cat(few.stderr).mean()


def test_magnitude_removes_the_smallest_groups():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[0].weight[3].mul_(1e-3)
        model[0].bias[3] = 0.0
        model[2].weight[:, 3].mul_(1e-3)
        model[0].weight[1].mul_(1e-2)
        model[0].bias[1] = 0.0
        model[2].weight[:, 1].mul_(1e-2)
    res = prune_structured(model, sparsity=0.4, pattern="neuron", method="magnitude", params="^0")
    assert res.layers[0]["removed"] == [1, 3] and res.model[0].out_features == 3


def test_global_scope_ranks_across_layers():
    build, kind, data = CASES["mlp"]
    model, batch = build(), data()
    res = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=0.5, pattern=kind, scope="global")
    assert sum(layer["total"] - layer["kept"] for layer in res.layers) == round(0.5 * 9)


def test_bad_input():
    model, (x, y) = mlp(), CASES["mlp"][2]()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
            prune_structured(model, sparsity=bad, pattern="neuron", method="magnitude")
    with pytest.raises(ArgumentError, match="magnitude"):
        prune_structured(model, sparsity=0.5, pattern="neuron", method="obs")
    with pytest.raises(ArgumentError, match="needs loss_fn and data"):
        prune_structured(model, sparsity=0.5, pattern="neuron", method="oba")
    with pytest.raises(ModelError, match="no prunable channel groups"):
        prune_structured(model, sparsity=0.5, pattern="channel", method="magnitude")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(x + self.a(x)) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="torch.fx"):
        find_groups(Branchy(), "neuron")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = x + self.a(x)
            return self.b(h)

    with pytest.raises(ModelError, match="'a'.*residual"):
        find_groups(Residual(), "neuron")

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0]

    with pytest.raises(ModelError, match="MultiheadAttention.*write the attention out"):
        find_groups(MHA(), "head")


def test_forward_with_a_hard_coded_width_is_refused():
    class Fixed(Attention):
        def forward(self, x):  # head width from the residual width: breaks once a head is gone
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2)).softmax(-1)
            return self.out(x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))).mean(1)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ModelError, match="sizes from the layers|size that pruning changed"):
        prune_structured(Fixed(), None, (x, torch.zeros(2, dtype=torch.long)), sparsity=0.5, pattern="head",
                         method="magnitude")


def test_the_output_check_leaves_a_train_mode_model_unchanged():
    # the pruned-vs-masked check must not update BatchNorm's running statistics nor trip on dropout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 3, 3),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    res = prune_structured(model, nn.CrossEntropyLoss(), (x, y), sparsity=0.5, pattern="channel",
                           method="magnitude", params="0.weight", inplace=True)
    kept = [i for i in range(4) if i not in res.layers[0]["removed"]]
    bn = res.model[1]
    assert res.model.training and bn.training
    assert torch.equal(bn.running_mean, stats[0][kept]) and torch.equal(bn.running_var, stats[1][kept])
    assert int(bn.num_batches_tracked) == 0


# iterative pruning (steps) -------------------------------------------------------------------
def _one_shot_reference(model, kind, batch, sparsity, method):
    """What steps=1 did before it existed: score once, cut the lowest, shrink."""
    from curvkit.compress.structured import magnitude_scores, select_groups

    sets = find_groups(model, kind)
    scores = (magnitude_scores(model, sets) if method == "magnitude"
              else oba_scores(model, nn.CrossEntropyLoss(), batch, sets).scores)
    removed = select_groups(scores, sets, sparsity)
    return removed, apply_structure(copy.deepcopy(model), structure_of(model, sets, removed))


@pytest.mark.parametrize("method", ["oba", "magnitude"])
@pytest.mark.parametrize("case", ["cnn", "heads"])
def test_one_step_is_the_one_shot_result(case, method):
    build, kind, data = CASES[case]
    model, batch = build(), data()
    removed, small = _one_shot_reference(model, kind, batch, 0.5, method)
    res = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=0.5, pattern=kind, method=method, steps=1)
    assert {layer["name"]: layer["removed"] for layer in res.layers} == removed
    assert all(layer["removed_per_round"] == [len(layer["removed"])] for layer in res.layers)
    torch.testing.assert_close(res.model(batch[0]), small(batch[0]), rtol=0, atol=0)


def test_schedule_is_geometric_in_the_kept_fraction():
    from curvkit.compress.structured import schedule

    kept = [1 - f for f in schedule(0.75, 4)]
    kept = torch.tensor([1.0] + kept, dtype=torch.float64)
    torch.testing.assert_close(kept[1:] / kept[:-1],
                               torch.full((4,), 0.25 ** 0.25, dtype=torch.float64), rtol=1e-12, atol=0)
    assert abs(kept[-1] - 0.25) < 1e-12 and schedule(0.3, 1) == [pytest.approx(0.3)]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_steps_reach_the_one_shot_group_counts(scope):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    batch = (torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,)))
    for sparsity in (0.3, 0.75, 0.95):
        one = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=sparsity, scope=scope)
        it = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=sparsity, scope=scope, steps=4)
        kept = lambda r: [layer["kept"] for layer in r.layers]  # noqa: E731
        if scope == "layer":
            assert kept(it) == kept(one)
        else:
            assert sum(kept(it)) == sum(kept(one))
        assert all(len(layer["removed_per_round"]) == 4 for layer in it.layers)
        assert all(sum(layer["removed_per_round"]) == layer["total"] - layer["kept"] for layer in it.layers)
        # every round removes something at 75% per layer here: the rounds are real, not one cut
        if scope == "layer" and sparsity == 0.75:
            assert all(min(layer["removed_per_round"]) >= 1 for layer in it.layers)
            assert it.layers[0]["matvecs"] > one.layers[0]["matvecs"]


def test_a_round_with_nothing_to_remove_is_not_scored():
    build, kind, data = CASES["heads"]  # 2 heads, 1 to remove in 4 rounds: one round removes it
    res = prune_structured(build(), nn.CrossEntropyLoss(), data(), sparsity=0.5, pattern=kind, steps=4)
    assert res.layers[0]["removed_per_round"] == [0, 1, 0, 0] and res.layers[0]["matvecs"] == 2


@pytest.mark.parametrize("case", ["cnn", "heads", "mlp"])
def test_three_steps_rebuild_a_fresh_original(case, tmp_path):
    import json

    build, kind, data = CASES[case]
    model, batch = build(), data()
    res = prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=0.6, pattern=kind, steps=3)
    paths = res.save(tmp_path / "pruned.pt")
    fresh = build()
    with torch.no_grad():  # other weights: only the structure and the checkpoint make it equal
        for p in fresh.parameters():
            p.normal_()
    structure = json.loads(paths[1].read_text())
    rebuilt = PruneResult(model=fresh, method="oba", pattern=kind, sparsity=res.sparsity,
                          structure=structure).rebuild(fresh)
    rebuilt.load_state_dict(torch.load(paths[0], weights_only=True), strict=True)
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(batch[0]), res.model.eval()(batch[0]), rtol=0, atol=0)
    # the shrunk model is the original with the removed groups zeroed (original unit indices)
    sets = find_groups(model, kind)
    masked = zero_groups(copy.deepcopy(model), sets, {layer["name"]: layer["removed"] for layer in res.layers})
    torch.testing.assert_close(res.model(batch[0]), masked.eval()(batch[0]), rtol=0, atol=1e-12)


def test_steps_keep_a_frozen_layer_frozen():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].requires_grad_(False)
    batch = (torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64))
    res = prune_structured(model, nn.MSELoss(), batch, sparsity=0.5, steps=2, params=["0.weight", "0.bias"])
    assert not res.model[0].weight.requires_grad and res.model[2].weight.requires_grad


def test_bad_steps():
    model, batch = mlp(), CASES["mlp"][2]()
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ArgumentError, match="steps must be a positive int"):
            prune_structured(model, nn.CrossEntropyLoss(), batch, sparsity=0.5, steps=bad)
    from curvkit import compress

    with pytest.raises(ArgumentError, match="steps=2.*structured"):
        compress.prune(model, data=batch[0], sparsity=0.5, method="magnitude", steps=2)
    with pytest.raises(ArgumentError, match="curvature.*method='oba'"):
        compress.prune(model, data=batch[0], sparsity=0.5, method="magnitude", curvature="ggn")


def test_params_may_be_the_callers_tensors_or_modules():
    from curvkit import compress

    model, (x, y) = mlp(), CASES["mlp"][2]()
    for spec in ([model[0].weight], model[0], "^0"):
        for res in (prune_structured(model, sparsity=0.4, pattern="neuron", method="magnitude", params=spec),
                    compress.prune(model, data=x, sparsity=0.4, pattern="neuron", method="magnitude", params=spec)):
            assert [layer["name"] for layer in res.layers] == ["0"]
