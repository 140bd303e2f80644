"""Review fixes: each test pins a number the monitor got wrong before."""

import pytest
import torch
from torch import nn

from curvkit.monitor import preconditioner

F64 = torch.float64


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g)
    return model, x, y


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_step_is_lr_p_inverse_times_the_raw_first_moment(amsgrad):
    # the threshold 2(1+b1)/((1-b1) lr) is that of theta -= lr P^-1 m with m the raw EMA; P must be
    # the preconditioner of that form, bias corrections included (early steps: 1 - b1^t is far from 1)
    model, x, y = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-3, amsgrad=amsgrad)
    params = list(model.parameters())
    for _ in range(3):
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
        P = preconditioner(opt, params)
        torch.testing.assert_close(after - before, -0.05 * m / P.diagonal, rtol=1e-10, atol=1e-14)


def sgd_diverges(lam, **opt_kw):
    theta = torch.ones(1, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([theta], **opt_kw)
    for _ in range(2000):
        opt.zero_grad()
        (0.5 * lam * theta.square().sum()).backward()
        opt.step()
    return not float(theta.detach().abs()) <= 1.0  # inf or NaN after an overflow: diverged


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.5), dict(momentum=0.0)])
def test_sgd_threshold_is_where_torch_sgd_turns_unstable(kw):
    from curvkit.monitor import CurvatureMonitor

    model, x, y = tiny(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **kw)
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), optimizer=opt,
                           quantities=("sharpness", "preconditioned_sharpness"))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    rec = mon.measure()
    thr = rec.thresholds["sharpness"]
    assert rec.thresholds["preconditioned_sharpness"] == pytest.approx(thr)
    assert not sgd_diverges(0.97 * thr, lr=0.1, **kw)
    assert sgd_diverges(1.03 * thr, lr=0.1, **kw)


def test_raise_on_error_false_records_a_failed_measurement_and_keeps_the_schedule():
    import warnings

    from curvkit.errors import DataError
    from curvkit.monitor import CurvatureMonitor

    model, x, y = tiny(2)
    probe = (x.clone(), y)
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), probe, every=2, lr=0.1, raise_on_error=False)
    mon.step()
    probe[0].add_(1.0)  # the probe set changed: the next measurement fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            mon.step()
    assert [r.step for r in mon.history] == [0, 2, 4]
    assert all(r.info.get("failed") and "changed" in r.message for r in mon.history[1:])
    assert sum("failed and was recorded" in str(w.message) for w in caught) == 1
    strict = CurvatureMonitor(model, nn.CrossEntropyLoss(), probe, every=1, lr=0.1)
    strict.step()
    probe[0].add_(1.0)
    with pytest.raises(DataError, match="changed"):
        strict.step()


def test_a_replaced_parameter_or_a_dtype_change_is_refused_not_measured_stale():
    from curvkit.errors import ModelError
    from curvkit.monitor import CurvatureMonitor

    model, x, y = tiny(3)
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, lr=0.1)
    mon.step()
    model[2].weight = nn.Parameter(3.0 * model[2].weight.detach())  # a new tensor, not an in-place update
    with pytest.raises(ModelError, match="replaced"):
        mon.step()
    model, x, y = tiny(4)
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=1, lr=0.1)
    model.load_state_dict({k: 2 * v for k, v in model.state_dict().items()})  # in place: followed
    torch.testing.assert_close(torch.tensor(mon.measure().values["sharpness"][0], dtype=F64),
                               torch.linalg.eigvalsh(__import__("curvkit").hessian(
                                   model, nn.CrossEntropyLoss(), (x, y)).dense())[-1], rtol=1e-3, atol=1e-8)
    model.float()
    with pytest.raises(ModelError, match="dtype"):
        mon.measure()
