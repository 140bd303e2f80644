"""What AdaHessian and Sophia do beyond the contract (test_contract.py): the three ways to drive
them (torch's loop with create_graph=True, a closure that returns the loss, torch's closure that
calls backward itself), what each needs, closure errors, NaN curvature, and the foreach path."""

import io

import pytest
import torch
from torch import nn

from curvkit.errors import ArgumentError, CurvkitError, LossError, ModelError, NonFiniteError
from curvkit.optim import AdaHessian, Sophia

from ._problems import KINDS, class_batches, class_closure, classifier


def _run(model, opt, batches, start, n):
    for i in range(start, start + n):
        opt.step(class_closure(model, batches[i % len(batches)]))


def _torch_loop(model, opt, batches, start, n, create_graph=True):
    for i in range(start, start + n):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward(create_graph=create_graph)
        opt.step()


HUTCHINSON = ["adahessian", "sophia-h"]


@pytest.mark.parametrize("kind", HUTCHINSON)
def test_torch_loop_with_create_graph_equals_the_closure(kind):
    runs = []
    for drive in (_run, _torch_loop):
        model = classifier()
        drive(model, KINDS[kind](model.parameters(), seed=3), class_batches(), 0, 7)  # refreshes at 0, 3, 6
        runs.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("kind", HUTCHINSON)
def test_torch_loop_without_create_graph_is_refused_on_refresh_steps_only(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters())  # every=3
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ModelError, match=r"create_graph=True.*closure"):
        _torch_loop(model, opt, batches, 0, 1, create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    _torch_loop(model, opt, batches, 0, 1)
    _torch_loop(model, opt, batches, 1, 2, create_graph=False)  # steps 1 and 2 reuse the diagonal
    with pytest.raises(ModelError, match="create_graph"):
        _torch_loop(model, opt, batches, 3, 1, create_graph=False)
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())  # p.grad left detached


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_closure_that_calls_backward_works_with_create_graph_and_is_refused_without(kind):
    def closure_of(model, batch, create_graph):
        x, y = batch

        def closure():  # torch's convention
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward(create_graph=create_graph)
            return loss, out
        return closure

    runs, batches = [], class_batches()
    for own in (True, False):
        model = classifier()
        opt = KINDS[kind](model.parameters(), seed=3)
        for i in range(4):
            opt.step(class_closure(model, batches[i % 3]) if own else closure_of(model, batches[i % 3], True))
        runs.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the same steps, whoever differentiates
    opt.step(closure_of(model, batches[0], False))  # steps 4 and 5 reuse the diagonal: plain backward will do
    opt.step(closure_of(model, batches[1], False))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CurvkitError, match="create_graph=True|retain_graph=True"):
        opt.step(closure_of(model, batches[2], False))  # step 6 refreshes it
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gnb_without_a_closure_is_refused_on_refresh_steps():
    model, (x, y) = classifier(), class_batches()[0]
    opt = Sophia(model.parameters(), estimator="gnb")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(LossError, match=r"closure.*\(loss, outputs\)"):
        opt.step()


@pytest.mark.parametrize("kind", list(KINDS))
def test_grads_are_left_for_inspection_and_zero_grad_clears_them(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters())
    opt.step(class_closure(model, batches[0]))
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_the_deprecated_update_each_still_works():
    model = classifier()
    with pytest.warns(DeprecationWarning, match="every=2"):
        opt = AdaHessian(model.parameters(), update_each=2)
    assert opt.param_groups[0]["every"] == 2 and "update_each" not in opt.param_groups[0]
    with pytest.raises(ArgumentError, match="every only"):
        Sophia(model.parameters(), every=4, update_each=2)
    _run(model, opt, class_batches(), 0, 2)
    old = opt.state_dict()  # a state_dict saved before the rename
    for g in old["param_groups"]:
        g["update_each"] = g.pop("every")
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    fresh = AdaHessian(model.parameters())
    fresh.load_state_dict(torch.load(buf))
    assert fresh.param_groups[0]["every"] == 2 and "update_each" not in fresh.param_groups[0]
    with pytest.warns(DeprecationWarning):
        fresh.add_param_group({"params": [nn.Parameter(torch.ones(2))], "update_each": 5})
    assert fresh.param_groups[1]["every"] == 5


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("returned", [None, 1.5, "tensor"])
def test_closure_must_return_a_scalar_loss(kind, returned):
    model, (x, y) = classifier(), class_batches()[0]
    opt = KINDS[kind](model.parameters())
    out = {None: None, 1.5: 1.5, "tensor": None}[returned]

    def closure():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="none") if returned == "tensor" else out
        return loss, logits

    with pytest.raises(LossError, match="closure"):
        opt.step(closure)
    with pytest.raises(LossError, match="closure"):
        opt.step(lambda: closure()[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_without_graph(kind):
    model, (x, y) = classifier(), class_batches()[0]
    opt = KINDS[kind](model.parameters())

    def closure():
        with torch.no_grad():
            logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    with pytest.raises(CurvkitError, match="no_grad|detach"):
        opt.step(closure)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unused_parameter(kind):
    model, batches = classifier(), class_batches()
    extra = nn.Parameter(torch.ones(3))
    opt = KINDS[kind](list(model.parameters()) + [extra])
    with pytest.raises(ModelError, match="requires_grad_"):
        opt.step(class_closure(model, batches[0]))


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_hvp_needs_a_second_order_graph(cls):
    w = nn.Parameter(torch.ones(4))
    opt = cls([w], lr=0.1)
    with pytest.raises(ModelError, match="linear"):
        opt.step(lambda: (w * torch.arange(4.0)).sum())  # linear: the gradient has no graph


def test_gnb_needs_the_outputs():
    model, (x, y) = classifier(), class_batches()[0]
    opt = Sophia(model.parameters(), estimator="gnb")
    with pytest.raises(LossError, match="outputs"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    with pytest.raises(LossError, match="outputs"):
        opt.step(lambda: (nn.functional.cross_entropy(model(x), y), model(x).detach()))


def test_invalid_seed():
    with pytest.raises(ArgumentError, match="seed"):
        AdaHessian(classifier().parameters(), seed="a")


def _generator_state(opt):
    return opt.state_dict()["curvkit"]["generator"]


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_nan_curvature_leaves_parameters_untouched(cls):
    # |w|^1.5 has a finite loss and gradient at w = 0 but an infinite second derivative there
    w = nn.Parameter(torch.tensor([0.0, 1.0, -2.0]))
    opt = cls([w], lr=0.1)
    before, gen = w.detach().clone(), _generator_state(opt)
    with pytest.raises(NonFiniteError, match="curvature estimate has NaN/inf"):
        opt.step(lambda: w.abs().pow(1.5).sum())
    assert torch.equal(w, before) and torch.equal(gen, _generator_state(opt)) and not opt.state


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_nan_gradient_leaves_parameters_untouched(cls):
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = cls([w], lr=0.1)
    before = w.detach().clone()
    with pytest.raises(NonFiniteError, match="gradient"):
        opt.step(lambda: w.sqrt().sum() + (w**2).sum())  # finite loss, infinite gradient at 0
    assert torch.equal(w, before)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_path_equals_the_per_tensor_path(kind, dtype):
    runs = []
    for foreach in (False, True):
        model, batches = classifier(dtype=dtype), class_batches(dtype=dtype)
        opt = KINDS[kind](model.parameters(), foreach=foreach, weight_decay=0.1, seed=3)
        _run(model, opt, batches, 0, 7)  # crosses refreshes at 0, 3, 6
        runs.append([p.detach() for p in model.parameters()])
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=tol, atol=tol)


def test_a_frozen_parameter_does_not_force_a_refresh_every_step(monkeypatch):
    """Regression: a frozen parameter never gets state, and "no state yet" made its group refresh
    the Hessian diagonal on every step, whatever `every` said."""
    import curvkit.optim._diag as diag_opt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].bias.requires_grad_(False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = AdaHessian(model.parameters(), lr=0.01, every=5, seed=0)
    calls, real = [], diag_opt.hutchinson_samples

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(diag_opt, "hutchinson_samples", counted)
    for _ in range(10):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert len(calls) == 2  # steps 0 and 5
