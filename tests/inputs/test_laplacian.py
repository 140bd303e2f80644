"""ck.laplacian's exact forward Laplacian against the trace of autograd's dense input Hessian
(float64, 1e-10), on every op with a rule, and the gradients through it for training."""

import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, CurvkitError, FallbackWarning, ShapeError, UnsupportedOpError

from .conftest import hessians, laplacians

D = torch.float64


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def celu_ref(x, a=0.7):  # torch's own celu double backward is off by ~1e-8; this is the formula
    return torch.where(x > 0, x, a * (torch.exp(x / a) - 1))


ACTIVATIONS = {
    "tanh": nn.Tanh(), "sin": Fn(torch.sin), "cos": Fn(torch.cos), "exp": Fn(lambda x: torch.exp(0.3 * x)),
    "softplus": nn.Softplus(), "softplus_beta": nn.Softplus(beta=2.0, threshold=1.0), "sigmoid": nn.Sigmoid(),
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "mish": nn.Mish(),
    "elu": nn.ELU(0.8), "selu": nn.SELU(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1),
    "logsigmoid": nn.LogSigmoid(), "relu_inplace": nn.ReLU(inplace=True),
}


def mlp(act, d=3, width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), act, nn.Linear(width, width), act, nn.Linear(width, 1)).to(D)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_exact_equals_the_trace_of_the_dense_hessian_for_every_activation(name):
    net = mlp(ACTIVATIONS[name])
    x = torch.randn(5, 3, dtype=D)
    r = ck.laplacian(net, x)
    torch.testing.assert_close(r.value, laplacians(net, x), atol=1e-10, rtol=0)
    torch.testing.assert_close(r.output, net(x)[:, 0], atol=1e-12, rtol=0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg).sum(), xg)
    torch.testing.assert_close(r.gradient, g, atol=1e-12, rtol=0)
    assert r.stderr is None and r.method == "exact" and r.directions == 3


def test_celu_follows_its_formula():
    net = mlp(nn.CELU(0.7))
    ref = mlp(Fn(celu_ref))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(5, 3, dtype=D)
    torch.testing.assert_close(ck.laplacian(net, x).value, laplacians(ref, x), atol=1e-10, rtol=0)


POINTWISE = {
    "log": lambda x: torch.log(x * x + 1).sum(-1), "log1p": lambda x: torch.log1p(x * x).sum(-1),
    "sqrt": lambda x: (x * x + 1).sqrt().sum(-1), "rsqrt": lambda x: torch.rsqrt(x * x + 1).sum(-1),
    "reciprocal": lambda x: (1 / (x * x + 2)).sum(-1), "div": lambda x: (x[:, 0] / (x[:, 1] ** 2 + 1)),
    "rdiv_tensor": lambda x: torch.ones(3, dtype=D) / (x * x + 1) @ torch.arange(3.0, dtype=D),
    "pow": lambda x: (x ** 3).sum(-1) + (x * x + 1).pow(0.5).sum(-1) + x.pow(2).sum(-1),
    "rpow": lambda x: (2.0 ** x).sum(-1), "tensor_pow": lambda x: ((x * x + 1) ** (x[:, :1] + 2)).sum(-1),
    "atan": lambda x: torch.atan(x).sum(-1), "erf": lambda x: torch.erf(x).sum(-1),
    "sinh_cosh": lambda x: (torch.sinh(x) * torch.cosh(x[:, :1])).sum(-1), "square": lambda x: x.square().sum(-1),
    "abs": lambda x: torch.abs(x).sum(-1) * x[:, 0], "expm1": lambda x: torch.expm1(0.5 * x).sum(-1),
    "neg_sub": lambda x: (2 - x)[:, 0] * (1 - x[:, 1]) - (-x[:, 0]) - x[:, 1] * 3 - (x[:, 2] - 1) ** 2,
    "methods": lambda x: x.tanh().sin().sum(dim=-1) + x.exp().mean(-1),
    "inplace": lambda x: (x * 1).tanh_().sum(-1),
}


@pytest.mark.parametrize("name", list(POINTWISE))
def test_exact_on_pointwise_ops_and_arithmetic(name):
    f = POINTWISE[name]
    x = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(ck.laplacian(f, x).value, laplacians(f, x), atol=1e-10, rtol=0)


class HardBoundary(nn.Module):  # products of the input with the network, as in the benchmark's PINN
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, xy):
        x, y = xy[:, :1], xy[:, 1:]
        return x * (1 - x) * y * (1 - y) * self.net(xy)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.sin(self.a(h))           # residual sum
        h = h * torch.sigmoid(self.b(h))       # gated product of two network branches
        return self.out(h) + (x ** 2).sum(-1, keepdim=True)


STRUCTURE = {
    "hard_boundary": HardBoundary(mlp(nn.Tanh(), d=2)),
    "residual_and_products": Residual(),
    "cat_stack_getitem": lambda x: torch.cat([x.sin(), x[:, :1] ** 2, torch.ones(x.shape[0], 1, dtype=D)], -1)
    .pow(2).sum(-1) * x[:, 1] + torch.stack([x[:, 0], x[:, 1] * x[:, 0]], 1).exp().sum(1),
    "reshape_permute_sum": lambda x: (x.reshape(-1, 1, 2) * x.view(-1, 2, 1)).permute(0, 2, 1).tanh().sum((1, 2)),
    "matmul_jet_jet": lambda x: (x[:, None, :] @ x[:, :, None]).reshape(-1).sin(),
    "einsum": lambda x: torch.einsum("bi,bi->b", x.sin(), x.cos()) + torch.einsum("bi,ij->bj", x, torch.eye(2, dtype=D))
    .pow(3).sum(-1),
    "where_mask": lambda x: torch.where(x[:, 0] > 0, x[:, 0] ** 3, torch.sin(x[:, 1])),
    "split_unbind": lambda x: x.split(1, dim=1)[0].squeeze(1) * x.unbind(1)[1].cos(),
    "linear_tensor_rmatmul": lambda x: (torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=D) @ x.T).T.tanh().sum(-1),
    "layer_norm": nn.Sequential(nn.Linear(2, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1)).to(D),
}


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_exact_through_products_sums_and_tensor_ops(name):
    f = STRUCTURE[name]
    if isinstance(f, nn.Module):
        f.to(D)
    x = torch.rand(5, 2, dtype=D) - 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # all of these have rules
        r = ck.laplacian(f, x)
    torch.testing.assert_close(r.value, laplacians(f, x), atol=1e-10, rtol=0)


def test_inputs_with_an_event_shape_and_a_batch_of_one():
    f = lambda x: (x.sin() * x.flatten(1).sum(-1)[:, None, None]).sum((1, 2))  # noqa: E731
    x = torch.randn(3, 2, 2, dtype=D)
    r = ck.laplacian(f, x)
    torch.testing.assert_close(r.value, laplacians(f, x), atol=1e-10, rtol=0)
    assert r.gradient.shape == x.shape
    torch.testing.assert_close(ck.laplacian(f, x[:1]).value, r.value[:1], atol=1e-12, rtol=0)


def test_a_function_without_rules_falls_back_exactly_and_says_which_op():
    f = lambda x: torch.logsumexp(x.sin(), -1) * torch.sigmoid(x).sum(-1)  # noqa: E731
    x = torch.randn(4, 3, dtype=D)
    with pytest.warns(FallbackWarning, match="torch.logsumexp"):
        r = ck.laplacian(f, x)
    torch.testing.assert_close(r.value, laplacians(f, x), atol=1e-10, rtol=0)
    with pytest.raises(UnsupportedOpError, match="torch.logsumexp.*fallback=True"):
        ck.laplacian(f, x, fallback=False)


def test_chunks_of_directions_give_the_same_laplacian():
    net = mlp(nn.Tanh(), d=5)
    x = torch.randn(4, 5, dtype=D)
    full, parts = ck.laplacian(net, x), ck.laplacian(net, x, chunk=2)
    torch.testing.assert_close(parts.value, full.value, atol=1e-12, rtol=0)
    torch.testing.assert_close(parts.gradient, full.gradient, atol=1e-12, rtol=0)


def pinn_loss(lap):
    return (lap + 1.0).pow(2).mean()


@pytest.mark.parametrize("act", ["tanh", "gelu", "silu"])
def test_parameter_gradients_through_the_laplacian_equal_nested_autograds(act):
    net = mlp(ACTIVATIONS[act])
    x = torch.rand(6, 3, dtype=D)
    params = list(net.parameters())
    ours = torch.autograd.grad(pinn_loss(ck.laplacian(net, x).value), params, allow_unused=True)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg).sum(), xg, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), xg, create_graph=True)[0][:, i] for i in range(3))
    ref = torch.autograd.grad(pinn_loss(lap), params, allow_unused=True)
    assert ours[-1] is None and ref[-1] is None  # the last bias does not reach a Laplacian
    for a, b in zip(ours[:-1], ref[:-1]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_create_graph_false_returns_detached_values():
    net = mlp(nn.Tanh())
    x = torch.rand(3, 3, dtype=D)
    r = ck.laplacian(net, x, create_graph=False)
    assert r.value.grad_fn is None and r.gradient.grad_fn is None
    torch.testing.assert_close(r.value, ck.laplacian(net, x).value.detach(), atol=1e-12, rtol=0)


def test_a_function_of_constants_has_zero_laplacian():
    x = torch.rand(3, 2, dtype=D)
    r = ck.laplacian(lambda x: torch.ones(x.shape[0], dtype=D), x)
    assert torch.equal(r.value, torch.zeros(3, dtype=D))


# ---------------------------------------------------------------------------------------- diffusion, biharmonic
@pytest.mark.parametrize("kind", ["psd", "indefinite", "low_rank", "per_example"])
def test_diffusion_equals_sum_of_a_times_the_hessian(kind):
    net = mlp(nn.Tanh(), d=3)
    x = torch.randn(4, 3, dtype=D)
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 3, generator=g, dtype=D)
    a = {"psd": M @ M.T, "indefinite": M + M.T, "low_rank": M[:, :1] @ M[:, :1].T,
         "per_example": torch.randn(4, 3, 3, generator=g, dtype=D)}[kind]
    H = hessians(net, x)
    A = a if a.dim() == 3 else a.expand(4, 3, 3)
    r = ck.diffusion(net, x, a)
    torch.testing.assert_close(r.value, (A * H).sum((1, 2)), atol=1e-10, rtol=0)
    if kind == "low_rank":
        assert r.directions == 1
    torch.testing.assert_close(ck.diffusion(net, x, torch.eye(3, dtype=D)).value, laplacians(net, x),
                               atol=1e-10, rtol=0)


def test_biharmonic_equals_nested_autograd():
    net = mlp(nn.Tanh(), d=2, width=6)
    x = torch.randn(3, 2, dtype=D)

    def lap_of(p):  # Laplacian of one point, by autograd, differentiable
        H = torch.autograd.functional.hessian(lambda q: net(q[None])[0, 0], p, create_graph=True)
        return H.trace()

    ref = torch.stack([torch.autograd.functional.hessian(lap_of, xi).trace() for xi in x])
    r = ck.biharmonic(net, x)
    torch.testing.assert_close(r.value, ref, atol=1e-10, rtol=0)
    est = ck.biharmonic(net, x, method="hutchinson", probes=40, seed=0)
    assert ((est.value - ref).abs() < 4 * est.stderr).all()


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_say_what_to_do():
    net = mlp(nn.Tanh())
    x = torch.rand(4, 3, dtype=D)
    with pytest.raises(ShapeError, match=r"one number per example.*\(4, 2\).*pick a component"):
        ck.laplacian(lambda x: torch.cat([net(x), net(x)], 1), x)
    with pytest.raises(ShapeError, match="floating point.*x.float"):
        ck.laplacian(net, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"x\[None\]"):
        ck.laplacian(net, x[0])
    for bad in (0, -2, 1.5):
        with pytest.raises(ArgumentError, match="probes must be a positive int"):
            ck.laplacian(net, x, method="hutchinson", probes=bad)
    with pytest.raises(ArgumentError, match="probes <= d = 3.*method='exact'"):
        ck.laplacian(net, x, method="stde", probes=4)
    with pytest.raises(ArgumentError, match="method must be"):
        ck.laplacian(net, x, method="nested")
    with pytest.raises(ShapeError, match=r"a must be a tensor of shape \(3, 3\)"):
        ck.diffusion(net, x, torch.eye(2, dtype=D))
    with pytest.raises(CurvkitError, match="torch.cat / torch.where"):
        def assign(x):
            y = x.sin()
            y[:, 0] = 0.0
            return y.sum(-1)
        ck.laplacian(assign, x)


# ---------------------------------------------------------------------------------------- review fixes
def test_where_with_number_branches_has_zero_derivatives_there():
    for f in (lambda x: torch.where(x > 0, x, 1.0).pow(3).sum(-1), lambda x: torch.where(x > 0, 2.0, x).pow(3).sum(-1)):
        x = torch.randn(5, 3, dtype=D)
        torch.testing.assert_close(ck.laplacian(f, x).value, laplacians(f, x), atol=1e-10, rtol=0)


def test_pow_with_a_constant_tensor_exponent_and_a_negative_base():
    p = torch.tensor([2.0, 3.0, 0.5], dtype=D)
    f = lambda x: ((x[:, :2] - 5) ** p[:2]).sum(-1) + ((x * x + 1) ** p).sum(-1)  # noqa: E731
    x = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(ck.laplacian(f, x).value, laplacians(f, x), atol=1e-10, rtol=0)


def _inplace_without_rule(x):
    h = x * 1
    h.sinh_()
    h.unsqueeze_(1)
    return h.pow(2).sum((1, 2))


def test_inplace_ops_without_a_rule_act_on_the_jet():
    x = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(ck.laplacian(_inplace_without_rule, x, fallback=False).value,
                               laplacians(_inplace_without_rule, x), atol=1e-10, rtol=0)


def _acc_add(x):
    acc = torch.zeros(x.shape[0], 3, dtype=D)
    acc += x.sin()
    return acc.sum(-1)


def _acc_method(x):
    acc = torch.ones(x.shape[0], 3, dtype=D)
    acc.mul_(x.sin())
    return acc.sum(-1)


def _assign_into_tensor(x):
    out = torch.zeros(x.shape[0], 2, dtype=D)
    out[:, 0] = x[:, 0].sin()
    return out.sum(-1)


def _write_into_part(x):
    h = x.sin()
    h[:, :1].mul_(2.0)
    return h.sum(-1)


@pytest.mark.parametrize("f,match", [(_acc_add, "add_.*plain tensor.*t = t \\+"), (_acc_method, "mul_.*plain tensor"),
                                     (_assign_into_tensor, "torch.cat / torch.where"), (_write_into_part, "a part")])
def test_inplace_writes_taylor_mode_cannot_track_are_refused(f, match):
    """These used to return silently wrong Laplacians (the derivatives were dropped)."""
    with pytest.raises(UnsupportedOpError, match=match):
        ck.laplacian(f, torch.randn(3, 3, dtype=D))
