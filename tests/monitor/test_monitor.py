"""CurvatureMonitor: every recorded number against a dense computation on a tiny float64 model."""

import json
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, DataError, ModelError, NonFiniteError
from curvkit.monitor import BudgetWarning, CurvatureMonitor, adam_threshold

F64 = torch.float64


def problem(seed=0, n=24, dropout=False, hidden=5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = [nn.Linear(3, hidden), nn.Tanh()] + ([nn.Dropout(0.2)] if dropout else []) + [nn.Linear(hidden, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def dense_h(model, loss_fn, data):
    return ck.hessian(model, loss_fn, data).dense()


def train(model, loss_fn, data, opt, mon, steps, batch=False):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        mon.step(batch=(x[:8], y[:8]) if batch else None)


def test_every_sharpness_is_within_its_residual_of_the_dense_top_eigenvalue_at_that_step():
    model, loss_fn, data = problem(hidden=16)  # n = 115: the warm starts run Lanczos (tiny operators go dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    mon = CurvatureMonitor(model, loss_fn, data, every=3, k=2, tol=1e-8, optimizer=opt)
    x, y = data
    exact = {}
    for step in range(12):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        rec = mon.step()
        if rec is not None:  # the weights have changed since the operator was built
            exact[step] = torch.linalg.eigvalsh(dense_h(model, loss_fn, data)).flip(0)[:2]
            cold = ck.eigenvalues(ck.hessian(model, loss_fn, data), k=2, tol=1e-8, seed=5)
            assert (torch.tensor(rec.values["sharpness"], dtype=F64) - cold.values).abs().max() <= \
                max(rec.errors["sharpness"]) + float(cold.residuals.max()) + 1e-12
    assert [r.step for r in mon.history] == [0, 3, 6, 9]
    assert all(r.products["sharpness"] < 115 for r in mon.history)  # Lanczos, not the dense path (n products)
    tops = set()
    for r in mon.history:
        for v, res, ex in zip(r.values["sharpness"], r.errors["sharpness"], exact[r.step]):
            assert abs(v - float(ex)) <= res + 1e-10
        assert r.thresholds["sharpness"] == pytest.approx((2 + 2 * 0.9) / 0.5)
        assert r.converged["sharpness"] and r.products["sharpness"] > 0
        tops.add(round(r.values["sharpness"][0], 6))
    assert len(tops) == 4  # it measured four different weights


def test_a_measurement_after_the_weights_change_sees_the_new_weights():
    model, loss_fn, data = problem(1)
    mon = CurvatureMonitor(model, loss_fn, data, every=1, tol=1e-10, lr=0.1)
    a = mon.measure().values["sharpness"][0]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7)
    b = mon.measure().values["sharpness"][0]
    assert b == pytest.approx(float(torch.linalg.eigvalsh(dense_h(model, loss_fn, data))[-1]), abs=1e-8)
    assert abs(a - b) > 1e-3
    assert mon.history[-1].thresholds["sharpness"] == pytest.approx(20.0)


def test_warm_start_costs_at_most_three_block_products_in_the_steady_state():
    model, loss_fn, data = problem(2, hidden=16)  # n = 115: Lanczos, not the dense path of tiny operators
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = CurvatureMonitor(model, loss_fn, data, every=1, tol=1e-3, optimizer=opt)
    train(model, loss_fn, data, opt, mon, 12)
    cold = mon.history[0]
    steady = mon.history[2:]
    assert all(r.info["sharpness_block_products"] <= 3 for r in steady)
    assert max(r.products["sharpness"] for r in steady) < cold.products["sharpness"]
    # without the exploring column a re-measurement of an unchanged top eigenvector is one product
    mon0 = CurvatureMonitor(model, loss_fn, data, every=1, tol=1e-3, explore=0, lr=1e-3)
    mon0.measure()
    assert mon0.measure().products["sharpness"] == 1


def test_preconditioned_sharpness_of_adam_is_that_of_p_inverse_h():
    model, loss_fn, data = problem(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    mon = CurvatureMonitor(model, loss_fn, data, every=2, tol=1e-9, optimizer=opt,
                           quantities=("sharpness", "preconditioned_sharpness"))
    train(model, loss_fn, data, opt, mon, 5)
    r = mon.history[-1]
    t = int(opt.state[model[0].weight]["step"])  # the first moment's bias correction 1 - b1^t is part of P
    P = torch.cat([(1 - 0.9**t) * ((opt.state[p]["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt() + 1e-8).reshape(-1)
                   for p in model.parameters()])
    ref = torch.linalg.eigvals(torch.diag(1 / P) @ dense_h(model, loss_fn, data)).real.max()
    assert abs(r.values["preconditioned_sharpness"][0] - float(ref)) <= r.errors["preconditioned_sharpness"][0] + 1e-9 * float(ref)
    assert r.thresholds["preconditioned_sharpness"] == pytest.approx(adam_threshold(0.01, 0.9)) == pytest.approx(3800.0)
    assert r.thresholds["sharpness"] is None  # no gradient-descent threshold for an adaptive method
    assert r.info["preconditioner"] == "Adam"


def test_preconditioned_sharpness_refuses_unknown_optimizers_and_needs_a_step():
    model, loss_fn, data = problem()
    with pytest.raises(ArgumentError, match="torch.optim.Adam"):
        CurvatureMonitor(model, loss_fn, data, optimizer=torch.optim.RMSprop(model.parameters()),
                         quantities=("preconditioned_sharpness",))
    with pytest.raises(ArgumentError, match="optimizer="):
        CurvatureMonitor(model, loss_fn, data, quantities=("preconditioned_sharpness",))
    mon = CurvatureMonitor(model, loss_fn, data, optimizer=torch.optim.Adam(model.parameters()),
                           quantities=("preconditioned_sharpness",))
    with pytest.raises(ArgumentError, match="first step"):
        mon.measure()


@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_every_must_be_a_positive_integer(every):
    model, loss_fn, data = problem()
    with pytest.raises(ArgumentError, match="every"):
        CurvatureMonitor(model, loss_fn, data, every=every)


def test_bad_options_are_refused():
    model, loss_fn, data = problem()
    for kw in ({"quantities": ("sharpnes",)}, {"budget": 1.5}, {"k": 0}, {"gradient": "full"},
               {"curvature": "fisher"}):
        with pytest.raises(ArgumentError):
            CurvatureMonitor(model, loss_fn, data, **kw)


def test_a_probe_set_that_changes_between_measurements_is_refused():
    model, loss_fn, (x, y) = problem()
    batches = [(x[:12].clone(), y[:12]), (x[12:].clone(), y[12:])]
    mon = CurvatureMonitor(model, loss_fn, batches, every=1, lr=0.1)
    mon.step()
    batches[1][0].add_(0.5)  # re-augmented in place
    with pytest.raises(DataError, match="changed"):
        mon.step()


def test_train_mode_with_dropout_is_refused_eval_mode_measures():
    model, loss_fn, data = problem(dropout=True)
    model.train()
    with pytest.raises(ModelError, match="dropout"):
        CurvatureMonitor(model, loss_fn, data, mode="train")
    mon = CurvatureMonitor(model, loss_fn, data, tol=1e-10)
    v = mon.measure().values["sharpness"][0]
    model.eval()
    assert v == pytest.approx(float(torch.linalg.eigvalsh(dense_h(model, loss_fn, data))[-1]), abs=1e-8)


def test_nan_weights_are_recorded_and_training_goes_on_unless_asked():
    model, loss_fn, data = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, data, every=1, optimizer=opt, quantities=("sharpness", "trace"))
    train(model, loss_fn, data, opt, mon, 2)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    rec = mon.step()
    assert rec.nonfinite and "NaN" in rec.message and rec.values == {}
    with torch.no_grad():
        model[0].weight[0, 0] = 0.1
    assert not mon.step().nonfinite  # and the warm start survived the bad record
    mon_strict = CurvatureMonitor(model, loss_fn, data, raise_on_nonfinite=True)
    with torch.no_grad():
        model[2].bias[0] = math.inf
    with pytest.raises(NonFiniteError):
        mon_strict.step()


def test_state_dict_resumes_history_schedule_and_warm_start():
    model, loss_fn, data = problem(4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = CurvatureMonitor(model, loss_fn, data, every=2, optimizer=opt)
    train(model, loss_fn, data, opt, mon, 5)
    state = json.loads(json.dumps({k: v for k, v in mon.state_dict().items() if k != "warm"}))
    state["warm"] = mon.state_dict()["warm"]
    again = CurvatureMonitor(model, loss_fn, data, every=2, optimizer=opt)
    again.load_state_dict(state)
    assert [r.step for r in again.history] == [0, 2, 4]
    train(model, loss_fn, data, opt, again, 2)
    assert [r.step for r in again.history] == [0, 2, 4, 6]
    assert again.history[-1].info["sharpness_block_products"] <= 3  # warm, not a cold start
    with pytest.raises(ArgumentError, match="state_dict"):
        again.load_state_dict({"history": []})


def test_budget_stretches_every_and_says_so_once():
    model, loss_fn, data = problem()
    mon = CurvatureMonitor(model, loss_fn, data, every=2, budget=0.1, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):  # a "training step" that costs nothing: any measurement is over budget
            mon.step()
    assert sum(issubclass(w.category, BudgetWarning) for w in caught) == 1
    assert mon.period > 2 and mon.history[-1].every > 2
    steps = [r.step for r in mon.history]
    assert len(steps) < 20 and all(b - a >= 2 for a, b in zip(steps, steps[1:]))


def test_trace_overlap_layers_batch_and_outliers_against_dense():
    model, loss_fn, data = problem(5, n=40)
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qs = ("sharpness", "trace", "grad_overlap", "layer_sharpness", "batch_sharpness", "outliers")
    mon = CurvatureMonitor(model, loss_fn, data, every=1, k=2, tol=1e-10, optimizer=opt, quantities=qs,
                           trace_probes=30, outlier_k=6, density_iterations=20, density_probes=4,
                           gradient="probe")
    rec = mon.measure(batch=(x[:10], y[:10]))
    Hd = dense_h(model, loss_fn, data)
    lam, U = torch.linalg.eigh(Hd)
    assert abs(rec.values["trace"] - float(Hd.trace())) < 4 * rec.errors["trace"] + 1e-9
    g = ck.hessian(model, loss_fn, data).loss_and_gradient()[1]
    top2 = U[:, -2:]
    assert rec.values["grad_overlap"] == pytest.approx(float((top2.T @ g).square().sum() / (g @ g)), abs=1e-6)
    assert rec.info["grad_overlap_source"] == "probe"
    offset = 0
    for name, (i, j) in {"0": (0, 20), "2": (20, 38)}.items():
        assert rec.values["layer_sharpness"][name] == pytest.approx(float(torch.linalg.eigvalsh(Hd[i:j, i:j])[-1]), abs=1e-8)
    Hb = dense_h(model, loss_fn, (x[:10], y[:10]))
    assert rec.values["batch_sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(Hb)[-1]), abs=1e-8)
    assert rec.info["batch_over_full"] == pytest.approx(rec.values["batch_sharpness"] / float(lam[-1]), rel=1e-6)
    assert isinstance(rec.values["outliers"], int) and rec.products["outliers"] > 0
    with pytest.raises(ArgumentError, match="batch"):
        mon.measure()  # batch_sharpness without the step's batch


def test_grad_overlap_uses_the_mini_batch_gradient_left_by_backward():
    model, loss_fn, (x, y) = problem(6)
    mon = CurvatureMonitor(model, loss_fn, (x, y), quantities=("grad_overlap",), k=2, tol=1e-10, lr=0.1)
    model.zero_grad()
    loss_fn(model(x[:6]), y[:6]).backward()
    rec = mon.measure()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    U = torch.linalg.eigh(dense_h(model, loss_fn, (x, y)))[1][:, -2:]
    assert rec.values["grad_overlap"] == pytest.approx(float((U.T @ g).square().sum() / (g @ g)), abs=1e-6)
    assert rec.info["grad_overlap_source"] == "batch (.grad)" and "sharpness" not in rec.values


def test_jsonl_plot_and_quiet_progress(tmp_path, capsys):
    model, loss_fn, data = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, loss_fn, data, every=2, optimizer=opt, quantities=("sharpness", "trace"))
    train(model, loss_fn, data, opt, mon, 6)
    lines = mon.to_jsonl(tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 2, 4]
    assert json.loads(lines[0])["thresholds"]["sharpness"] == pytest.approx(20.0)
    out = mon.plot(tmp_path / "m.png")
    assert out.stat().st_size > 1000
    mon.close()
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no progress line


def test_per_group_learning_rates_precondition_sgd():
    model, loss_fn, data = problem(7)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.4}, {"params": model[2].parameters(), "lr": 0.1}],
                          lr=0.4)
    mon = CurvatureMonitor(model, loss_fn, data, tol=1e-10, optimizer=opt, quantities=("preconditioned_sharpness",))
    r = mon.measure()
    scale = torch.cat([torch.ones(20, dtype=F64), torch.full((18,), 0.25, dtype=F64)])  # lr_g / lr
    ref = torch.linalg.eigvals(torch.diag(scale) @ dense_h(model, loss_fn, data)).real.max()
    assert r.values["preconditioned_sharpness"][0] == pytest.approx(float(ref), abs=1e-8)
    assert r.thresholds["preconditioned_sharpness"] == pytest.approx(2 / 0.4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_monitor_on_cuda_matches_the_cpu_within_its_residual():
    model, loss_fn, (x, y) = problem(8, hidden=16)
    ref = float(torch.linalg.eigvalsh(dense_h(model, loss_fn, (x, y)))[-1])
    model = model.float().cuda()
    mon = CurvatureMonitor(model, loss_fn, (x.float().cuda(), y.cuda()), tol=1e-4, lr=0.1,
                           quantities=("sharpness", "preconditioned_sharpness"),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        r = mon.measure()
        assert abs(r.values["sharpness"][0] - ref) <= r.errors["sharpness"][0] + 1e-4 * ref
        assert r.values["preconditioned_sharpness"][0] == pytest.approx(r.values["sharpness"][0], rel=1e-3)
