"""LayerHooks: each layer's input and the loss gradient at its output, right under in-place ops."""

import pytest
import torch
from torch import nn

from curvkit.errors import ModelError
from curvkit.model import LayerHooks, layers
from cases import DT, Shared, assert_close, randn


def _pair():
    """The same network with an in-place and an out-of-place ReLU after the first layer."""
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DT)
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    plain.load_state_dict(inplace.state_dict())
    return inplace, plain


def _reference_output_grads(model, x, y):
    outs = {}
    hs = [m.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o)) for k, m in (("0", model[0]), ("2", model[2]))]
    loss = ((model(x) - y) ** 2).sum()
    hs[0].remove(), hs[1].remove()
    return dict(zip(outs, torch.autograd.grad(loss, list(outs.values()))))


def test_gradients_at_the_output_are_right_under_an_inplace_relu():
    """Regression: the gradient at a layer's output is the one before the in-place ReLU that
    overwrites it, both through grad_targets (curvkit's own passes) and on_grad (a user's backward)."""
    inplace, plain = _pair()
    x, y = randn(5, 4), randn(5, 3, seed=1)
    ref = _reference_output_grads(plain, x, y)
    with torch.no_grad():
        assert (plain[0](x) < 0).any()  # the ReLU zeroes something: the in-place op matters
    ls = layers(inplace)
    with LayerHooks(ls, grad_targets=True) as rec:
        loss = ((inplace(x) - y) ** 2).sum()
    grads = torch.autograd.grad(loss, [rec.targets[n] for n in ("0", "2")])
    for n, g in zip(("0", "2"), grads):
        assert_close(g, ref[n])
    assert_close(rec.inputs["0"], x)
    seen = {}
    with LayerHooks(ls, on_grad=lambda layer, inp, g: seen.__setitem__(layer.name, g)):
        ((inplace(x) - y) ** 2).sum().backward()
    for n in ("0", "2"):
        assert_close(seen[n], ref[n])


def test_weight_sharing_is_refused_with_the_hint():
    model = Shared().double()
    ls = [layer for layer in layers(model) if layer.name == "lin"]
    with pytest.raises(ModelError, match="'lin' is called more than once.*use ck.ggn"):
        with LayerHooks(ls, root=model, hint="use ck.ggn"):
            model(randn(2, 4).requires_grad_(True))


def test_hooks_are_removed_and_record_only_when_enabled():
    inplace, _ = _pair()
    ls = layers(inplace)
    on = [False]
    rec = LayerHooks(ls, enabled=lambda: on[0]).attach()
    inplace(randn(2, 4))
    assert rec.attached and rec.inputs == {}
    on[0] = True
    inplace(randn(2, 4))
    assert set(rec.inputs) == {"0", "2"}
    rec.remove()
    rec.clear()
    inplace(randn(2, 4))
    assert not rec.attached and rec.inputs == {}
