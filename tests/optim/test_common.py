"""Behaviour both optimizers share: resume, devices, bf16, groups, errors, training."""

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


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_exact(kind):
    batches, N = class_batches(), 4  # update_each=3: refreshes at steps 0, 3, 6 cross the save
    ref = classifier()
    opt = KINDS[kind](ref.parameters(), seed=5)
    _run(ref, opt, batches, 0, 2 * N)

    model = classifier()
    opt = KINDS[kind](model.parameters(), seed=5)
    _run(model, opt, batches, 0, N)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu")
    model = classifier(seed=99)  # different init and seed: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = KINDS[kind](model.parameters(), seed=1234)
    opt.load_state_dict(saved["opt"])
    _run(model, opt, batches, N, N)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_reduces_loss_of_a_small_classifier(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters(), lr=0.05, weight_decay=0.0)
    losses = [opt.step(class_closure(model, batches[i % 3])).item() for i in range(40)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_parameters_keep_float32_state(kind):
    model, batches = classifier(dtype=torch.bfloat16), class_batches(dtype=torch.bfloat16)
    opt = KINDS[kind](model.parameters(), lr=0.05, weight_decay=0.0)
    losses = [opt.step(class_closure(model, batches[i % 3])).item() for i in range(25)]
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    # torch's load_state_dict would cast the float32 state to bf16; ours keeps it
    opt2 = KINDS[kind](model.parameters())
    opt2.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert opt2.state[p][k].dtype == torch.float32 and torch.equal(opt2.state[p][k], v)


def _saved(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters())
    _run(model, opt, batches, 0, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return model, buf


@pytest.mark.parametrize("kind", KINDS)
def test_state_loads_with_map_location_cpu(kind):
    model, buf = _saved(kind)
    opt = KINDS[kind](model.parameters())
    opt.load_state_dict(torch.load(buf, map_location="cpu"))
    _run(model, opt, class_batches(), 2, 2)
    assert all(v.device.type == "cpu" for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_state_saved_on_cpu_loads_on_cuda(kind):
    model, buf = _saved(kind)
    model = model.cuda()
    opt = KINDS[kind](model.parameters())
    opt.load_state_dict(torch.load(buf, map_location="cuda"))
    batches = [(x.cuda(), y.cuda()) for x, y in class_batches()]
    _run(model, opt, batches, 2, 4)
    assert all(v.is_cuda for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("kind", KINDS)
def test_param_groups_use_their_own_lr_and_weight_decay(kind):
    model, batches = classifier(), class_batches()
    first, second = model[0], model[2]
    frozen = [p.detach().clone() for p in first.parameters()]
    opt = KINDS[kind]([{"params": first.parameters(), "lr": 0.0},
                       {"params": second.parameters(), "weight_decay": 0.5}], weight_decay=0.0)
    assert opt.param_groups[1]["lr"] == opt.defaults["lr"] and opt.param_groups[0]["weight_decay"] == 0.0
    before = [p.detach().clone() for p in second.parameters()]
    _run(model, opt, batches, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(frozen, first.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(before, second.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_grads_are_left_for_inspection_and_zero_grad_clears_them(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters())
    opt.step(class_closure(model, batches[0]))
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
def test_step_without_closure(kind):
    opt = KINDS[kind](classifier().parameters())
    with pytest.raises(ArgumentError, match="closure"):
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_without_graph(kind):
    model, (x, y) = classifier(), class_batches()[0]
    opt = KINDS[kind](model.parameters())

    def closure():
        with torch.no_grad():
            logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    with pytest.raises(CurvkitError, match="no_grad|detach"):
        opt.step(closure)


@pytest.mark.parametrize("kind", KINDS)
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


def test_gnb_needs_logits():
    model, (x, y) = classifier(), class_batches()[0]
    opt = Sophia(model.parameters(), estimator="gnb")
    with pytest.raises(LossError, match="logits"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    with pytest.raises(LossError, match="logits"):
        opt.step(lambda: (nn.functional.cross_entropy(model(x), y), model(x).detach()))


@pytest.mark.parametrize("bad", [
    (AdaHessian, {"lr": -1.0}), (AdaHessian, {"lr": float("nan")}), (AdaHessian, {"betas": (1.0, 0.9)}),
    (AdaHessian, {"betas": (0.9,)}), (AdaHessian, {"eps": 0.0}), (AdaHessian, {"weight_decay": -0.1}),
    (AdaHessian, {"update_each": 0}), (AdaHessian, {"update_each": 2.5}), (AdaHessian, {"hessian_power": 2.0}),
    (AdaHessian, {"seed": "a"}), (Sophia, {"gamma": 0.0}), (Sophia, {"estimator": "adam"}),
    (Sophia, {"update_each": -3}), (Sophia, {"lr": "big"}),
])
def test_invalid_hyperparameters(bad):
    cls, kw = bad
    with pytest.raises(ArgumentError):
        cls(classifier().parameters(), **kw)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for st in opt.state.values() for k, v in st.items()},
            opt._gen.get_state())


def _unchanged(model, opt, snap):
    params, _, gen = snap
    return all(torch.equal(a, b) for a, b in zip(params, model.parameters())) and torch.equal(gen, opt._gen.get_state())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_loss_leaves_parameters_untouched(kind):
    model, batches = classifier(), class_batches()
    opt = KINDS[kind](model.parameters())
    opt.step(class_closure(model, batches[0]))
    snap = _snapshot(model, opt)
    x, y = batches[1]
    bad = (x * float("nan"), y)
    with pytest.raises(NonFiniteError):
        opt.step(class_closure(model, bad))
    assert _unchanged(model, opt, snap)
    opt.step(class_closure(model, batches[1]))  # still usable


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_nan_curvature_leaves_parameters_untouched(cls):
    # |w|^1.5 has a finite loss and gradient at w = 0 but an infinite second derivative there
    w = nn.Parameter(torch.tensor([0.0, 1.0, -2.0]))
    opt = cls([w], lr=0.1)
    before, gen = w.detach().clone(), opt._gen.get_state()
    with pytest.raises(NonFiniteError, match="parameters were not changed|NaN"):
        opt.step(lambda: w.abs().pow(1.5).sum())
    assert torch.equal(w, before) and torch.equal(gen, opt._gen.get_state()) and not opt.state[w]


@pytest.mark.parametrize("cls", [AdaHessian, Sophia])
def test_nan_gradient_leaves_parameters_untouched(cls):
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = cls([w], lr=0.1)
    before = w.detach().clone()
    with pytest.raises(NonFiniteError):
        opt.step(lambda: w.sqrt().sum() + (w**2).sum())  # finite loss, infinite gradient at 0
    assert torch.equal(w, before)


def test_load_state_dict_from_torch_optimizer_is_refused():
    model = classifier()
    sd = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(ArgumentError, match="curvkit"):
        AdaHessian(model.parameters()).load_state_dict(sd)


@pytest.mark.parametrize("kind", KINDS)
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
