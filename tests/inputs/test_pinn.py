"""The Poisson PINN of benchmarks/optim rewired to ck.laplacian trains exactly as with nested
autograd (float64, 1e-10), and K-FAC refuses input-derivative passes with a clear error."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import LossError
from curvkit.optim import KFAC

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.optim import workloads  # noqa: E402

D = torch.float64


def _train(laplacian, steps=12):
    task = workloads._pinn_task(0, "cpu", interior=64, dtype=D, laplacian=laplacian)
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss, _ = task.loss(task.batch(i))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return task, losses


def test_the_rewired_pinn_gives_the_same_solution_as_nested_autograd():
    ours, l1 = _train(workloads._laplacian)
    ref, l2 = _train(workloads.nested_autograd_laplacian)
    assert l1[-1] < l1[0]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-10, rtol=1e-10)
    for p, q in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    assert abs(ours.evaluate() - ref.evaluate()) < 1e-10


def test_hessian_vector_products_of_the_pinn_loss_match():
    """Second-order optimizers differentiate the loss twice: its HVPs agree too."""
    task = workloads._pinn_task(0, "cpu", interior=32, dtype=D)
    ref = workloads._pinn_task(0, "cpu", interior=32, dtype=D, laplacian=workloads.nested_autograd_laplacian)
    out = []
    for t in (task, ref):
        ps = list(t.model.parameters())
        loss, _ = t.loss(None)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        v = [torch.ones_like(p) for p in ps]
        out.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, ps, v)]))
    torch.testing.assert_close(out[0], out[1], atol=1e-10, rtol=1e-10)


def _pinn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)


def test_kfac_refuses_a_taylor_mode_pass():
    model = _pinn()
    opt = KFAC(model, lr=0.1)
    x = torch.rand(16, 2, dtype=D)
    with pytest.raises(LossError, match="ck.laplacian's Taylor mode.*AdaHessian, Shampoo or SOAP"):
        ck.laplacian(model, x).value.pow(2).mean().backward()
    opt.remove_hooks()
    ck.laplacian(model, x)  # without K-FAC's hooks it runs


def test_kfac_refuses_nested_autograd_input_derivatives_and_changes_nothing():
    model = _pinn()
    opt = KFAC(model, lr=0.1)
    x = torch.rand(16, 2, dtype=D).requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
    lap.pow(2).mean().backward()
    with pytest.raises(LossError, match="two output gradients from one forward.*AdaHessian"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # an ordinary loss still trains after zero_grad
    opt.zero_grad()
    model(x.detach()).pow(2).mean().backward()
    opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_kfac_operator_refuses_a_model_whose_forward_is_a_laplacian():
    class LaplacianModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _pinn()

        def forward(self, x):
            return ck.laplacian(self.net, x).value[:, None]

    x = torch.rand(8, 2, dtype=D)
    with pytest.raises(LossError, match="Taylor mode"):
        ck.kfac(LaplacianModel(), nn.MSELoss(), (x, torch.zeros(8, 1, dtype=D)))


def test_the_readme_section_runs():
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Laplacians and PINNs"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["lap"].value.shape == (256,) and scope["est"].stderr.shape == (256,)


def _poisson_residual():
    import math

    from curvkit.taylor import PDEResidual

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
    x = torch.rand(40, 2, dtype=D)
    f = 2 * math.pi**2 * torch.sin(math.pi * x[:, :1]) * torch.sin(math.pi * x[:, 1:])
    model = PDEResidual(net, lambda net, x: ck.laplacian(net, x).value[:, None])
    return net, model, x, f


def _nested_pinn_loss(net, x, f):
    from torch.func import functional_call

    shapes = [(k, p.shape, p.numel()) for k, p in net.named_parameters()]

    def loss(flat):
        i, p = 0, {}
        for k, s, m in shapes:
            p[k], i = flat[i : i + m].view(s), i + m
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(functional_call(net, p, (xx,)).sum(), xx, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, j].sum(), xx, create_graph=True)[0][:, j] for j in range(x.shape[1]))
        return ((lap[:, None] + f) ** 2).mean()

    return loss, torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_curvature_of_a_pinn_loss_equals_nested_autograd_and_analyze_runs_on_it():
    """The operator-preconditioning view: Hessian and Gauss-Newton of the PINN loss itself."""
    net, model, x, f = _poisson_residual()
    loss, flat = _nested_pinn_loss(net, x, f)
    H_ref = torch.autograd.functional.hessian(loss, flat)
    H = ck.hessian(model, nn.MSELoss(), (x, -f))
    torch.testing.assert_close(H.dense(), H_ref, atol=1e-10 * float(H_ref.abs().max()), rtol=0)
    # Gauss-Newton: (2/N) J^T J of the residual's Jacobian in the weights
    J = torch.autograd.functional.jacobian(lambda fl: _residual_at(net, x, fl), flat)
    G = ck.ggn(model, nn.MSELoss(), (x, -f))
    torch.testing.assert_close(G.dense(), 2 / x.shape[0] * J.T @ J, atol=1e-10, rtol=1e-10)
    r = ck.analyze(model, nn.MSELoss(), (x, -f), k=3, probes=10, density_iterations=20, progress=False)
    top = torch.linalg.eigvalsh(H_ref).flip(0)[:3]
    torch.testing.assert_close(torch.tensor(r.hessian["values"], dtype=D), top, rtol=1e-3, atol=0)
    assert r.density is not None and r.ggn["values"][0] > 0


def _residual_at(net, x, flat):
    from torch.func import functional_call

    i, p = 0, {}
    for k, q in net.named_parameters():
        p[k], i = flat[i : i + q.numel()].view(q.shape), i + q.numel()
    return ck.laplacian(lambda z: functional_call(net, p, (z,)), x).value


def test_analyze_reports_the_pinn_ggns_condition_number_as_an_honest_lower_bound():
    """PINN Gauss-Newton matrices are badly conditioned (here 7e8 with 12 weights, 2e17 with 24)."""
    from curvkit.taylor import PDEResidual

    torch.manual_seed(0)  # no output bias: a constant does not reach a Laplacian (a zero eigenvalue)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1, bias=False)).to(D)
    _, _, x, f = _poisson_residual()
    model = PDEResidual(net, lambda net, x: ck.laplacian(net, x).value[:, None])
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    J = torch.autograd.functional.jacobian(lambda fl: _residual_at(net, x, fl), flat)
    ev = torch.linalg.eigvalsh(2 / x.shape[0] * J.T @ J)
    true = float(ev[-1] / ev[0])
    assert 1e8 < true < 1e10
    r = ck.analyze(model, nn.MSELoss(), (x, -f), k=3, probes=10, density_iterations=20, progress=False,
                   condition=True, tol=1e-10)
    c = r.condition
    assert c["lower_bound"] <= true * (1 + 1e-6)  # Ritz values lie inside the spectrum: never above
    assert c["converged"] and abs(c["lower_bound"] - true) <= 1e-4 * true
    assert "GGN condition number" in r.to_markdown()
    import json

    json.dumps(r.to_dict())  # plain data
    assert ck.analyze(model, nn.MSELoss(), (x, -f), k=3, probes=10, density_iterations=20,
                      progress=False).condition is None


def test_the_monitor_tracks_a_pinn_losss_sharpness_during_training():
    from curvkit.monitor import CurvatureMonitor

    net, model, x, f = _poisson_residual()
    data = (x, -f)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    mon = CurvatureMonitor(model, nn.MSELoss(), data, every=5, optimizer=opt, tol=1e-8, progress=False)
    loss_fn = nn.MSELoss()
    checked = 0
    for _ in range(10):
        opt.zero_grad()
        loss_fn(model(x), -f).backward()
        opt.step()
        before = len(mon.history)
        mon.step()
        if len(mon.history) > before:  # measured now, on these weights
            loss, flat = _nested_pinn_loss(net, x, f)
            top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])
            assert abs(mon.history[-1].values["sharpness"][0] - top) <= 1e-6 * abs(top)
            checked += 1
    assert checked >= 2
