"""The pieces every curvkit optimizer shares (optim._base): the finiteness check, the error it
raises, and loading state into parameters of another dtype."""

import pytest
import torch

from curvkit.errors import NonFiniteError
from curvkit.optim import KFAC, SOAP, Shampoo
from curvkit.optim._base import all_finite, raise_non_finite

from ._problems import class_batches, classifier


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_does_not_overflow_on_large_finite_tensors(dtype):
    big = torch.ones(90_000, dtype=dtype)  # its L1 norm, 9e4, is past float16's 65504
    assert all_finite([big, torch.zeros(3)])
    assert not all_finite([big, torch.tensor([1.0, float("nan")], dtype=dtype)])
    assert not all_finite([torch.tensor([float("inf")], dtype=dtype)])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_all_finite_leaves_values_bit_identical_and_sees_every_tensor(device):
    g = torch.Generator().manual_seed(0)
    # mixed dtypes, a 0-d loss, a transposed view, a subnormal, signed zeros, huge finite values
    ts = [torch.randn(5, 7, generator=g).T, torch.tensor(2.5, dtype=torch.float64),
          torch.tensor([1e-40, -0.0, 3e38, -3e38]), torch.randn(9, generator=g).bfloat16(),
          torch.randn(4, generator=g).half(), torch.empty(0)]
    ts = [t.to(device) for t in ts]
    before = [t.clone() for t in ts]
    assert all_finite(ts)
    bits = [t.reshape(-1).contiguous().view(torch.uint8) for t in ts]
    assert all(torch.equal(a, b.reshape(-1).contiguous().view(torch.uint8)) for a, b in zip(bits, before))
    for i in range(5):  # a NaN or inf in any one of them is seen
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = list(ts)
            broken[i] = ts[i].clone()
            broken[i][(0,) * ts[i].dim()] = bad
            assert not all_finite(broken)


def test_all_finite_sees_complex_entries():
    z = torch.randn(4, dtype=torch.complex64)
    assert all_finite([z])
    z[2] = complex(1.0, float("nan"))
    assert not all_finite([z])


def test_conjugated_complex_gradients_are_checked():
    z = torch.randn(4, dtype=torch.complex64).conj()  # autograd hands out such lazily conjugated grads
    assert z.is_conj() and all_finite([z])
    assert not all_finite([torch.tensor([1 + 1j, complex(0, float("inf"))]).conj()])
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    c = torch.randn(3, dtype=torch.complex64)
    from curvkit.optim import AdaHessian
    AdaHessian([p], lr=0.1).step(lambda: (p.conj() * c).abs().square().sum())


@pytest.mark.parametrize("opt_cls", [Shampoo, SOAP, KFAC])
def test_steps_under_float64_default_dtype(opt_cls):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Linear(4, 3)
        opt = opt_cls(model) if opt_cls is KFAC else opt_cls(model.parameters())
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    finally:
        torch.set_default_dtype(before)
    assert all_finite([torch.randn(3)])  # nothing of the float64 run is left cached


@pytest.mark.parametrize("opt_cls", [Shampoo, SOAP])
def test_non_contiguous_loaded_state_still_updates(opt_cls):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3)
    opt = opt_cls(conv.parameters(), every=1)
    for _ in range(2):
        opt.zero_grad()
        conv(torch.randn(2, 4, 6, 6)).square().mean().backward()
        opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():  # e.g. a state dict converted to channels_last elsewhere
        if st["exp_avg"].dim() == 4:
            st["exp_avg"] = st["exp_avg"].contiguous(memory_format=torch.channels_last)
    opt.load_state_dict(sd)
    before = opt.state[conv.weight]["exp_avg"].clone()
    opt.zero_grad()
    conv(torch.randn(2, 4, 6, 6)).square().mean().backward()
    opt.step()
    assert not torch.equal(opt.state[conv.weight]["exp_avg"], before)


def test_all_finite_accepts_expanded_gradients_and_leaves_graphs_alone():
    x = torch.randn(3, requires_grad=True)
    (g,) = torch.autograd.grad(x.sum(), x, create_graph=True)  # an expanded tensor in a graph
    assert all_finite([g]) and not all_finite([g, torch.tensor([float("nan")])])
    (h,) = torch.autograd.grad((g * x).sum(), x)  # the graph through g still differentiates
    assert torch.equal(h, torch.ones(3))


def test_fp16_kfac_takes_a_finite_step():
    model = torch.nn.Linear(300, 300).half()
    opt = KFAC(model)
    x = torch.randn(8, 300).half()
    model(x).float().pow(2).mean().backward()
    opt.step()  # a finite gradient of 90,000 entries: no spurious NonFiniteError
    assert torch.isfinite(model.weight).all()


def test_a_python_float_loss_is_reported_not_a_type_error():
    with pytest.raises(NonFiniteError, match="loss is nan"):
        raise_non_finite("x", float("nan"), [])
    W = torch.zeros(4, 3, requires_grad=True)
    W.grad = torch.full_like(W, float("nan"))
    with pytest.raises(NonFiniteError, match="gradient"):
        SOAP([W]).step(lambda: 1.0)


def test_float64_state_loads_into_a_float32_model():
    model, batches = classifier(dtype=torch.float64), class_batches(dtype=torch.float64)
    opt = Shampoo(model.parameters(), every=1)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model32 = classifier()
    opt32 = Shampoo(model32.parameters(), every=1)
    opt32.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for st in opt32.state.values() for v in st.values()
               if torch.is_tensor(v) and v.is_floating_point())
    x, y = class_batches()[0]
    torch.nn.functional.cross_entropy(model32(x), y).backward()
    opt32.step()
