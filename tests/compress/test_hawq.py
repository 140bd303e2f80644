"""compress.sensitivity against the dense per-layer Hessian, and HAWQ's allocate_bits against brute
force over every per-layer choice (tiny float64 models)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit import compress
from curvkit.compress import UniformQuantizer
from curvkit.compress.hawq import pareto_frontier
from curvkit.errors import ArgumentError, FallbackWarning, NonFiniteError

DT = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def batch(seed=1, n=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


LOSS = nn.CrossEntropyLoss()


def dense_blocks(model, data, curvature="hessian"):
    """The dense per-layer diagonal blocks of the Hessian (or GGN) of the mean loss."""
    x, y = data
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    H = torch.autograd.functional.hessian(
        lambda v: LOSS(torch.func.functional_call(model, unflat(v), (x,)), y), flat)
    blocks, i = {}, 0
    for layer in ck.model.layers(model):
        k = sum(dict(model.named_parameters())[n].numel() for n in layer.param_names)
        blocks[layer.name] = H[i:i + k, i:i + k]
        i += k
    return blocks


# -- sensitivity ------------------------------------------------------------------------------
def test_sensitivity_matches_the_dense_blocks_within_their_error_bars():
    model, data = mlp(), batch()
    s = compress.sensitivity(model, LOSS, data, quantities=("trace", "top_eigenvalue", "diagonal"), probes=30,
                             diagonal_probes=200, seed=0)
    blocks = dense_blocks(model, data)
    assert s.names == list(blocks)
    for name, Hl in blocks.items():
        r = s[name]
        assert r.parameters == Hl.shape[0]
        exact_tr = float(Hl.trace())
        assert abs(r.trace - exact_tr) <= 4 * r.trace_stderr + 1e-10, (name, r.trace, exact_tr, r.trace_stderr)
        top = float(torch.linalg.eigvalsh(Hl)[-1])
        assert r.converged
        # a Ritz value lies within its residual norm of an eigenvalue; here, of the top one
        assert abs(r.top_eigenvalue - top) <= r.top_residual + 1e-10, (name, r.top_eigenvalue, top)
        est = torch.cat([r.diagonal[n].reshape(-1) for n in r.param_names])
        err = torch.cat([r.diagonal_stderr[n].reshape(-1) for n in r.param_names])
        assert bool(((est - Hl.diagonal()).abs() <= 4 * err + 1e-10).all()), name
        assert r.trace_products == 30 and r.diagonal_products == 200
    assert s.cost["trace"]["products"] == 30 * len(blocks)
    json.dumps(s.to_dict())


def test_a_stochastic_layer_trace_is_actually_estimated():
    # the 8x8+8 layer (72 parameters) is beyond the Hutch++ sketch of 10: a real estimate with a real error bar
    s = compress.sensitivity(mlp(), LOSS, batch(), quantities=("trace",), probes=30)
    assert s["2"].trace_stderr > 0


def test_sensitivity_accepts_an_operator_and_the_ggn():
    model, data = mlp(), batch()
    G = ck.ggn(model, LOSS, data)
    a = compress.sensitivity(None, None, None, curvature=G, quantities=("top_eigenvalue",))
    b = compress.sensitivity(model, LOSS, data, curvature="ggn", quantities=("top_eigenvalue",))
    assert a.curvature == b.curvature == "ggn"
    for ra, rb in zip(a, b):
        assert ra.top_eigenvalue == pytest.approx(rb.top_eigenvalue, rel=1e-12)
        assert ra.trace is None


def test_the_report_layer_section_is_the_sensitivity_code_path():
    model, data = mlp(), batch()
    rep = ck.analyze(model, LOSS, data, k=2, probes=12, density_probes=2, density_iterations=8, seed=3)
    s = compress.sensitivity(model, LOSS, data, probes=12, seed=3)
    assert rep.layers == s.rows()
    assert rep.cost["quantities"]["per-layer traces"]["products"] == s.cost["trace"]["products"]
    assert rep.cost["quantities"]["per-layer top eigenvalue"]["products"] == s.cost["top_eigenvalue"]["products"]


def test_sensitivity_bad_quantity():
    with pytest.raises(ArgumentError, match="quantities"):
        compress.sensitivity(mlp(), LOSS, batch(), quantities=("trace", "norm"))
    with pytest.raises(ArgumentError, match="curvature"):
        compress.sensitivity(mlp(), LOSS, batch(), curvature="hessain")


# -- allocate_bits ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sens():
    return compress.sensitivity(mlp(), LOSS, batch(), curvature="ggn", quantities=("trace",), probes=30)


def brute(plan):
    """(size bytes, omega) of every one of the |bits|^L allocations."""
    per = [[(layer["choices"][b]["size"], layer["choices"][b]["omega"]) for b in plan.choices] for layer in plan.layers]
    out = []
    for combo in itertools.product(range(len(plan.choices)), repeat=len(per)):
        out.append((plan.fixed_size + sum(per[i][c][0] for i, c in enumerate(combo)),
                    sum(per[i][c][1] for i, c in enumerate(combo)),
                    {layer["name"]: plan.choices[c] for layer, c in zip(plan.layers, combo)}))
    return out


@pytest.mark.parametrize("method", ["v3", "v2"])
def test_plan_equals_brute_force_over_every_choice(sens, method):
    model = mlp()
    ref = compress.allocate_bits(model, bits=(2, 3, 4), size_budget=1e9, sensitivity=sens)
    combos = brute(ref)
    assert len(ref.layers) == 3 and len(combos) == 27
    sizes = sorted({c[0] for c in combos})
    for budget in sizes[1:-1:3] + [sizes[0], sizes[-1]]:
        plan = compress.allocate_bits(model, bits=(2, 3, 4), size_budget=budget, sensitivity=sens, method=method)
        fit = [c for c in combos if c[0] <= budget]
        best = min(c[1] for c in fit)
        least = min(c[0] for c in fit if c[1] <= best * (1 + 1e-12))
        assert plan.size <= budget
        assert plan.omega == pytest.approx(best, rel=1e-12)
        assert plan.size == least  # ties go to the smaller size
        assert plan.predicted_loss_delta == plan.omega / 2
    omegas = sorted({c[1] for c in combos})
    for lb in [o / 2 * 1.0000001 for o in omegas[::4]]:
        plan = compress.allocate_bits(model, bits=(2, 3, 4), loss_budget=lb, sensitivity=sens, method=method)
        least = min(c[0] for c in combos if c[1] / 2 <= lb)
        assert plan.size == least and plan.predicted_loss_delta <= lb
        assert plan.omega == pytest.approx(min(c[1] for c in combos if c[0] == least and c[1] / 2 <= lb), rel=1e-12)


def test_frontier_is_the_exact_pareto_set_monotone_and_holds_the_plan(sens):
    model = mlp()
    plan = compress.allocate_bits(model, bits=(2, 3, 4, 8), size_budget=600, sensitivity=sens)
    combos = brute(plan)
    nondominated = sorted({(s, o) for s, o, _ in combos
                           if not any((s2 <= s and o2 < o) or (s2 < s and o2 <= o) for s2, o2, _ in combos)})
    got = [(p.size, p.omega) for p in plan.frontier]
    assert len(got) == len(nondominated)
    for (s, o), (s2, o2) in zip(got, nondominated):
        assert s == s2 and o == pytest.approx(o2, rel=1e-12)
    assert all(a.size < b.size and a.omega > b.omega for a, b in zip(plan.frontier, plan.frontier[1:]))
    assert any(p.bits == plan.bits for p in plan.frontier)
    assert plan.frontier[0].bits == {n: 2 for n in plan.bits} and plan.frontier[-1].bits == {n: 8 for n in plan.bits}


def test_pareto_frontier_on_random_tables():
    rng = np.random.default_rng(0)
    S = rng.integers(1, 50, size=(4, 3))
    O = rng.random((4, 3))
    pts = pareto_frontier(S, O)
    allv = [(int(S[range(4), c].sum()), float(O[range(4), c].sum())) for c in itertools.product(range(3), repeat=4)]
    nd = {v for v in allv if not any((a <= v[0] and b < v[1]) or (a < v[0] and b <= v[1]) for a, b in allv)}
    got = {(int(S[range(4), i].sum()), float(O[range(4), i].sum())) for i in pts}
    assert got == nd


def test_apply_leaves_the_model_alone_and_quantizes_each_layer_at_its_bits(sens):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=280, sensitivity=sens)
    assert len(set(plan.bits.values())) > 1  # a genuinely mixed plan
    q = plan.apply(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for name, b in plan.bits.items():
        W, Wq = model.get_submodule(name).weight, q.get_submodule(name).weight
        assert torch.equal(Wq, UniformQuantizer(b)(W.detach()))
        assert all(len(torch.unique(row)) <= 2 ** b for row in Wq)
        assert not torch.equal(Wq, W)
        assert torch.equal(q.get_submodule(name).bias, model.get_submodule(name).bias)
    same = plan.apply(model, inplace=True)
    assert same is model and torch.equal(model.get_submodule("0").weight, q.get_submodule("0").weight)


def test_size_counts_codes_scales_and_unquantized_parameters(sens):
    model = mlp()
    plan = compress.allocate_bits(model, bits=(4,), size_budget=1e9, sensitivity=sens)
    biases = (8 + 8 + 3) * 8  # float64 biases
    codes = (6 * 8 + 8 * 8 + 8 * 3) * 4 / 8
    scales = (8 + 8 + 3) * 16 / 8
    assert plan.fixed_size == biases and plan.size == biases + codes + scales


def test_measure_plot_and_json(sens, tmp_path):
    model, data = mlp(), batch()
    plan = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=280, sensitivity=sens)
    plan.measure(model, LOSS, data)
    with torch.no_grad():
        assert plan.base_loss == pytest.approx(float(LOSS(model(data[0]), data[1])), rel=1e-12)
        assert plan.measured_loss == pytest.approx(float(LOSS(plan.apply(model)(data[0]), data[1])), rel=1e-12)
    assert all(p.measured_loss is not None for p in plan.frontier)
    assert plan.plot(tmp_path / "pareto.png").stat().st_size > 0
    d = json.loads(plan.to_json())
    assert d["bits"] == plan.bits and len(d["frontier"]) == len(plan.frontier)


def test_latency_and_bops_constraints(sens):
    model, data = mlp(), batch()
    lat = {n: {2: 1.0, 4: 1.0, 8: 5.0} for n in ("0", "2", "4")}
    free = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens)
    assert set(free.bits.values()) == {8}
    plan = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens, latency=lat,
                                  latency_budget=7.0)
    assert plan.latency <= 7.0 and sorted(plan.bits.values()) == [4, 4, 8]
    # BOPs: MACs per example x weight bits x 8 activation bits; MACs of a linear = in * out
    macs = {"0": 48, "2": 64, "4": 24}
    plan = compress.allocate_bits(model, LOSS, data, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens,
                                  bops_budget=8 * (48 * 4 + 64 * 4 + 24 * 8))
    assert plan.bops == sum(macs[n] * b * 8 for n, b in plan.bits.items()) <= 8 * (48 * 4 + 64 * 4 + 24 * 8)


# -- bad input ----------------------------------------------------------------------------------
def test_a_budget_no_plan_meets_names_the_smallest_feasible_size(sens):
    model = mlp()
    ref = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens)
    small, large = ref.frontier[0].size, ref.frontier[-1].size
    for method in ("v3", "v2"):
        with pytest.raises(ArgumentError, match=f"smallest feasible size is {small:g} bytes.*above {large:g}"):
            compress.allocate_bits(model, bits=(2, 4, 8), size_budget=small - 1, sensitivity=sens, method=method)
        with pytest.raises(ArgumentError, match="smallest reachable is"):
            compress.allocate_bits(model, bits=(2, 4, 8), loss_budget=ref.frontier[-1].omega / 2 * 0.5,
                                   sensitivity=sens, method=method)
    with pytest.raises(ArgumentError, match="least each can be"):
        compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens,
                               latency={n: {2: 1.0, 4: 1.0, 8: 1.0} for n in ("0", "2", "4")}, latency_budget=2.0)


@pytest.mark.parametrize("bits", [(1, 4), (2.5, 4), ("4",), (), 4, (True, 4)])
def test_bits_must_be_integers_of_at_least_two(sens, bits):
    with pytest.raises(ArgumentError, match="integers >= 2"):
        compress.allocate_bits(mlp(), bits=bits, size_budget=1e9, sensitivity=sens)


def test_exactly_one_budget(sens):
    with pytest.raises(ArgumentError, match="exactly one"):
        compress.allocate_bits(mlp(), sensitivity=sens)
    with pytest.raises(ArgumentError, match="exactly one"):
        compress.allocate_bits(mlp(), sensitivity=sens, size_budget=100, loss_budget=1.0)
    with pytest.raises(ArgumentError, match="method"):
        compress.allocate_bits(mlp(), sensitivity=sens, size_budget=100, method="v1")
    with pytest.raises(ArgumentError, match="latency"):
        compress.allocate_bits(mlp(), sensitivity=sens, size_budget=100, latency_budget=3.0)
    with pytest.raises(ArgumentError, match="latency has no entry"):
        compress.allocate_bits(mlp(), sensitivity=sens, size_budget=1e9, latency={"0": {2: 1, 4: 1, 8: 1}},
                               latency_budget=3.0)
    with pytest.raises(ArgumentError, match="needs loss_fn and data"):
        compress.allocate_bits(mlp(), size_budget=100)


def test_non_finite_and_negative_traces():
    model, data = mlp(), batch()
    s = compress.sensitivity(model, LOSS, data, quantities=("trace",), probes=12)
    s["2"].trace = math.nan
    with pytest.raises(NonFiniteError, match="'2'"):
        compress.allocate_bits(model, size_budget=1e9, sensitivity=s)
    s["2"].trace = -1.0
    with pytest.warns(FallbackWarning, match="'2'.*curvature='ggn'"):
        plan = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=s)
    assert plan.bits["2"] == 2  # no sensitivity: the fewest bits cost nothing
    assert plan.layers[1]["mean_trace"] == 0.0 and plan.warnings


def test_no_quantizable_layer_names_the_supported_kinds():
    model = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    with pytest.raises(ArgumentError, match="linear"):
        compress.allocate_bits(model, LOSS, batch(), size_budget=1e9, params="0")


def test_a_uniform_width_budget_is_the_size_of_that_uniform_plan(sens):
    model = mlp()
    ref = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=1e9, sensitivity=sens)
    uniform4 = ref.fixed_size + sum(row["choices"][4]["size"] for row in ref.layers)
    plan = compress.allocate_bits(model, bits=(2, 4, 8), size_budget="4bit", sensitivity=sens)
    assert plan.budget["size_budget"] == uniform4 and plan.size <= uniform4
    same = compress.allocate_bits(model, bits=(2, 4, 8), size_budget=uniform4, sensitivity=sens)
    assert same.bits == plan.bits
    with pytest.raises(ArgumentError, match="needs 3 among the bit widths"):
        compress.allocate_bits(model, bits=(2, 4, 8), size_budget="3bit", sensitivity=sens)
    with pytest.raises(ArgumentError, match="'<N>bit'"):
        compress.allocate_bits(model, bits=(2, 4, 8), size_budget="lots", sensitivity=sens)
