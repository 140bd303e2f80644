"""The KFAC optimizer: arguments, the SGD fallback, hooks, and the tie to ck.kfac (one core)."""

import gc

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, ModelError
from curvkit.optim import KFAC

from ._problems import class_batches, classifier

D = torch.float64


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def test_parameters_instead_of_the_model_are_refused():
    with pytest.raises(ModelError, match=r"KFAC\(model"):
        KFAC(classifier().parameters())


def test_first_direction_equals_the_operator_inverse_applied_to_the_gradient():
    model = nn.Linear(6, 3).to(D)
    x, y = class_batches(1, size=20, dtype=D)[0]
    lam = 1e-2
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="empirical")
    _, grad = K.loss_and_gradient()
    expected = K.inverse(lam) @ grad
    opt = KFAC(model, lr=1.0, damping=lam, momentum=0.0, kl_clip=None)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    _step(model, opt, x, y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(before - after, expected, atol=1e-10, rtol=0)
    A, G = K.factors["(root)"]
    st = opt.state[model.weight]
    torch.testing.assert_close(st["kfac_A"], A, atol=1e-12, rtol=0)
    torch.testing.assert_close(st["kfac_G"], G, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kl_clip", [1e-6, 1e3])
def test_kl_clip_bounds_the_step_and_is_inactive_when_loose(kl_clip):
    model = nn.Linear(6, 3).to(D)
    x, y = class_batches(1, size=20, dtype=D)[0]
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="empirical")
    _, grad = K.loss_and_gradient()
    d = K.inverse(1e-2) @ grad
    lr = 0.5
    nu = min(1.0, (kl_clip / (lr**2 * float(d @ grad))) ** 0.5)  # predicted KL lr^2 nu^2 <d, F d> <= kl_clip
    opt = KFAC(model, lr=lr, damping=1e-2, momentum=0.0, kl_clip=kl_clip)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    _step(model, opt, x, y)
    step = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(step, lr * nu * d, atol=1e-12, rtol=0)
    assert (nu < 1) == (kl_clip == 1e-6)  # the tight bound binds, the loose one does not


def test_a_frozen_weight_leaves_a_bias_only_block():
    model = nn.Linear(6, 3).to(D)
    model.weight.requires_grad_(False)
    x, y = class_batches(1, size=20, dtype=D)[0]
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), params=["bias"], kind="empirical")
    expected = K.inverse(1e-2) @ K.loss_and_gradient()[1]
    opt = KFAC(model, lr=1.0, damping=1e-2, momentum=0.0, kl_clip=None)
    b0 = model.bias.detach().clone()
    _step(model, opt, x, y)
    torch.testing.assert_close(b0 - model.bias.detach(), expected, atol=1e-10, rtol=0)
    assert opt.state[model.bias]["kfac_A"].shape == (1, 1)


def test_unsupported_layers_get_sgd_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    opt = KFAC(model, lr=0.1, momentum=0.5, weight_decay=0.01)
    assert opt.fallback == ["1.weight", "1.bias"]
    assert [layer.name for layer in opt.layers] == ["0", "3"]
    (x, y), (x2, y2) = class_batches(2, dtype=D)
    norm = model[1].weight
    p0 = norm.detach().clone()
    _step(model, opt, x, y)
    g0 = norm.grad.clone()
    torch.testing.assert_close(norm.detach(), p0 * (1 - 0.1 * 0.01) - 0.1 * g0, atol=1e-14, rtol=0)
    p1 = norm.detach().clone()
    _step(model, opt, x2, y2)
    torch.testing.assert_close(norm.detach(), p1 * (1 - 0.1 * 0.01) - 0.1 * (0.5 * g0 + norm.grad),
                               atol=1e-14, rtol=0)
    assert "kfac_A" in opt.state[model[0].weight] and "kfac_A" not in opt.state[norm]


def test_factors_are_collected_on_schedule_and_hooks_are_removed():
    model, batches = classifier(), class_batches()
    opt = KFAC(model, factor_every=2)
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert len(hooked) == 3  # the root's pre-hook and the two Linear layers
    seen = []
    for i in range(4):
        _step(model, opt, *batches[i % 3])
        seen.append(opt.state[model[0].weight]["kfac_A"].clone())
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]) and torch.equal(seen[2], seen[3])
    opt.zero_grad()
    opt.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    opt2 = KFAC(model)
    del opt2
    gc.collect()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hooks_do_not_keep_the_optimizer_alive():
    model = classifier()
    opt = KFAC(model)
    _step(model, opt, *class_batches()[0])
    ref = __import__("weakref").ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    model(torch.randn(2, 6)).sum().backward()  # no dangling hook breaks the model


def test_weight_sharing_is_refused():
    lin = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = lin, nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.lin(torch.tanh(self.lin(x))))

    model = Twice()
    opt = KFAC(model)
    with pytest.raises(ModelError, match="more than once"):
        _step(model, opt, *class_batches()[0])


def test_conv_net_trains_and_gradient_accumulation_averages_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).to(D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 4, 4, generator=g, dtype=D)
    y = x.reshape(32, -1)[:, :3].argmax(1)
    opt = KFAC(model, lr=0.1, damping=1e-2)
    losses = [_step(model, opt, x, y).item() for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    # two half-batch backwards before one step: factors are the average of the halves' factors
    model2 = nn.Sequential(nn.Linear(6, 3)).to(D)
    opt2 = KFAC(model2, lr=0.0)
    (xb, yb), = class_batches(1, size=16, dtype=D)
    opt2.zero_grad()
    for h in (slice(0, 8), slice(8, 16)):
        (nn.functional.cross_entropy(model2(xb[h]), yb[h]) / 2).backward()
    opt2.step()
    halves = [ck.kfac(model2, nn.CrossEntropyLoss(), (xb[h], yb[h]), kind="empirical").factors["0"]
              for h in (slice(0, 8), slice(8, 16))]
    st = opt2.state[model2[0].weight]
    torch.testing.assert_close(st["kfac_A"], (halves[0][0] + halves[1][0]) / 2, atol=1e-12, rtol=0)
    # the gradient of loss/2 scaled by the half batch: G is a quarter of the halves' average
    torch.testing.assert_close(st["kfac_G"], (halves[0][1] + halves[1][1]) / 8, atol=1e-12, rtol=0)


def test_failed_step_leaves_factors_and_counter_alone():
    model, batches = classifier(), class_batches()
    opt = KFAC(model, inverse_every=2)
    _step(model, opt, *batches[0])
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    x, y = batches[1]
    with pytest.raises(ck.errors.NonFiniteError, match="not changed"):
        _step(model, opt, x * float("inf"), y)
    assert opt.state_dict()["curvkit"]["step"] == 1
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())
    _step(model, opt, *batches[1])  # the statistics of the failed step are gone: a finite step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_grad_drops_the_statistics_of_a_skipped_step():
    model, (x, y) = classifier(), class_batches()[0]
    opt = KFAC(model)
    loss = nn.functional.cross_entropy(model(x * float("inf")), y)
    loss.backward()  # a backward whose step is skipped (as GradScaler does on an overflow)
    _step(model, opt, x, y)  # zero_grad first: the stale, non-finite statistics are gone
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils): a linear layer with its weight stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_a_gpt2_style_conv1d_is_preconditioned_not_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 6), nn.Tanh(), Conv1D(3, 8)).to(D)
    x, y = class_batches(1, size=20, dtype=D)[0]
    opt = KFAC(model, lr=1.0, damping=1e-2, momentum=0.0, kl_clip=None)
    assert opt.fallback == [] and [layer.name for layer in opt.layers] == ["0", "2"]
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="empirical")
    expected = K.inverse(1e-2) @ K.loss_and_gradient()[1]
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    _step(model, opt, x, y)
    step = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(step, expected, atol=1e-10, rtol=0)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert not torch.allclose(step, grad, atol=1e-3)  # not the SGD step


def test_kfac_with_no_layer_to_precondition_says_why():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match=r"none of the chosen.*0\.weight: module '0' is a Embedding.*LayerNorm"):
        KFAC(model)
    opt = KFAC(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))  # some layers: the rest is said, not refused
    assert opt.fallback_reasons == {"1.weight": "module '1' is a LayerNorm", "1.bias": "module '1' is a LayerNorm"}


def test_param_groups_by_name_and_their_own_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x, y = class_batches(1, size=20, dtype=D)[0]
    opt = KFAC(model, params=[{"params": "^0\\.", "damping": 1.0}, {"params": "^2\\."}], lr=1.0, momentum=0.0,
               kl_clip=None)
    assert [g["damping"] for g in opt.param_groups] == [1.0, 1e-3]
    expected = {}
    for name, lam in (("0", 1.0), ("2", 1e-3)):  # each layer's block, solved with its group's damping
        K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), params=f"^{name}\\.", kind="empirical")
        expected[name] = K.inverse(lam) @ K.loss_and_gradient()[1]
    before = {n: torch.cat([p.detach().reshape(-1).clone() for p in model[int(n)].parameters()]) for n in expected}
    _step(model, opt, x, y)
    for n, e in expected.items():
        after = torch.cat([p.detach().reshape(-1) for p in model[int(n)].parameters()])
        torch.testing.assert_close(before[n] - after, e, atol=1e-10, rtol=0)
    with pytest.raises(ArgumentError, match="more than one param group"):
        KFAC(model, params=[{"params": "0"}, {"params": "0.weight"}])
