"""Tiny float64 models, data and dense references computed without curvkit.

The references follow the definitions, not curvkit's code:
- Hessian: ``torch.autograd.functional.hessian`` of the loss on the concatenated data as a
  function of the flat parameter vector (``torch.func.functional_call``);
- GGN: ``J^T H_loss J`` with ``J = jacobian`` of the flat outputs and ``H_loss = hessian`` of
  the loss with respect to the outputs;
- empirical Fisher: ``c * sum_n g_n g_n^T`` with ``g_n`` the gradient of example n's
  negative log-likelihood (the loss with reduction='sum' on that example alone) and ``c`` one
  over the number of loss terms (mean) or 1 (sum).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.autograd.functional import hessian as ag_hessian
from torch.autograd.functional import jacobian as ag_jacobian
from torch.func import functional_call

DT = torch.float64  # every exactness test runs in float64 (set explicitly, not as a global default)
TOL = 1e-10
D_IN, D_OUT = 4, 3
UNEVEN = (7, 5, 3)


# ---------------------------------------------------------------------------------------------
# models (all outputs (N, 3); a few dozen parameters each)
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, 6), nn.Linear(6, D_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> tanh -> Linear on 1 x 4 x 4 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 2 * 2, D_OUT)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class Shared(nn.Module):
    """The same Linear applied twice: weight sharing inside one forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class LNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(D_IN, 5), nn.LayerNorm(5), nn.Linear(5, D_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine parameters and running statistics (eval != train for BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if isinstance(model, (ConvBN, LNNet)) and (".weight" in name or ".bias" in name) and p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g, dtype=DT))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=DT))
    return model


MODELS = {"mlp": MLP, "convbn": ConvBN, "shared": Shared, "layernorm": LNNet}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _perturb(MODELS[kind]().double(), seed + 100)  # left in train mode, as nn.Module starts


def make_inputs(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    shape = (n, 1, 4, 4) if kind == "convbn" else (n, D_IN)
    return torch.randn(shape, generator=g, dtype=DT)


def make_targets(loss: str, n: int, g: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, D_OUT, (n,), generator=g)
    if loss == "mse":
        return torch.randn(n, D_OUT, generator=g, dtype=DT)
    if loss == "bce":
        return torch.rand(n, D_OUT, generator=g, dtype=DT).round()
    raise ValueError(loss)


def make_batches(kind: str, loss: str, sizes=UNEVEN, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(make_inputs(kind, n, g), make_targets(loss, n, g)) for n in sizes]


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    return LOSSES[loss](reduction=reduction)


def concat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ---------------------------------------------------------------------------------------------
# dense references
def chosen_names(model: nn.Module, names=None) -> list[str]:
    return [n for n, p in model.named_parameters() if (names is None and p.requires_grad) or (names and n in names)]


class Flat:
    """The model as a function of a flat vector over the parameters ``names``."""

    def __init__(self, model: nn.Module, names=None, train: bool = False):
        self.model, self.train = model, train
        self.names = chosen_names(model, names)
        params = dict(model.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.theta0 = torch.cat([params[n].detach().reshape(-1) for n in self.names]).clone()
        self.others = {n: p.detach() for n, p in params.items() if n not in self.names}

    def unflat(self, theta):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = s.numel()
            out[n] = theta[i : i + k].reshape(s)
            i += k
        return out

    def __call__(self, theta, x):
        was = {m: m.training for m in self.model.modules()}
        self.model.train(self.train)
        try:
            # cloned buffers: a train-mode BatchNorm must not touch the model's running stats
            buffers = {n: b.clone() for n, b in self.model.named_buffers()}
            return functional_call(self.model, (self.unflat(theta), self.others, buffers), (x,))
        finally:
            for m, t in was.items():
                m.training = t


def ref_hessian(model, loss_fn, batches, names=None, train=False, per_batch_weights=None):
    """Hessian of the loss on the concatenated data (or of sum_b w_b loss_b if weights given)."""
    f = Flat(model, names, train)
    if per_batch_weights is None:
        X, Y = concat(batches)
        L = lambda th: loss_fn(f(th, X), Y)  # noqa: E731
    else:
        L = lambda th: sum(w * loss_fn(f(th, x), y) for w, (x, y) in zip(per_batch_weights, batches))  # noqa: E731
    return _hessian(L, f.theta0)


def _hessian(fn, x):
    # reverse-over-reverse, vmapped over the rows: the same matrix as the default loop, faster
    return ag_hessian(fn, x, vectorize=True)


def ref_ggn(model, loss_fn, batches, names=None):
    """Explicit J^T H_loss J on the concatenated data."""
    f = Flat(model, names)
    X, Y = concat(batches)
    out0 = f(f.theta0, X).detach()
    J = ag_jacobian(lambda th: f(th, X).reshape(-1), f.theta0, vectorize=True)  # (N*C, n)
    H_out = _hessian(lambda o: loss_fn(o.reshape(out0.shape), Y), out0.reshape(-1))  # (N*C, N*C)
    return J.T @ H_out @ J


def ref_empirical_fisher(model, loss: str, reduction: str, batches, names=None):
    """c * sum_n g_n g_n^T, g_n the gradient of example n's NLL (reduction='sum' on it alone)."""
    f = Flat(model, names)
    X, Y = concat(batches)
    per_example = make_loss(loss, "sum")
    G = []
    for n in range(len(Y)):
        th = f.theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(per_example(f(th, X[n : n + 1]), Y[n : n + 1]), th)
        G.append(g)
    G = torch.stack(G)
    terms = len(Y) if loss == "ce" else f(f.theta0, X).numel()  # CE: one term per example; else per output
    c = 1.0 / terms if reduction == "mean" else 1.0
    return c * G.T @ G


def assert_close(A: torch.Tensor, B: torch.Tensor, tol: float = TOL):
    assert A.shape == B.shape, (A.shape, B.shape)
    err = float((A - B).abs().max())
    assert err < tol, f"max abs difference {err:.3e} >= {tol:.0e} (scale {float(B.abs().max()):.3e})"


def training_flags(model):
    return [m.training for m in model.modules()]


def buffers_copy(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_buffers_equal(model, before):
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed"



# ---------------------------------------------------------------------------------------------
# the standard grid: 15 examples as one batch or split 7 + 5 + 3; references cached per case
def case(kind: str, loss: str, reduction: str, one_batch: bool):
    """A fresh model (train mode), the loss, the data as the operator gets it, and the batches."""
    batches = make_batches(kind, loss, UNEVEN)
    data = [concat(batches)] if one_batch else batches
    return make_model(kind), make_loss(loss, reduction), data


@functools.lru_cache(maxsize=None)
def cached_ref(which: str, kind: str, loss: str, reduction: str) -> torch.Tensor:
    """Dense reference on the 15 examples of the grid (independent of how they are batched)."""
    model, loss_fn, batches = make_model(kind), make_loss(loss, reduction), make_batches(kind, loss, UNEVEN)
    if which == "hessian":
        return ref_hessian(model, loss_fn, batches)
    if which == "ggn":
        return ref_ggn(model, loss_fn, batches)
    if which == "fisher":
        return ref_empirical_fisher(model, loss, reduction, batches)
    raise ValueError(which)


def _grid():
    out = [(k, l, "mean", False) for k in MODELS for l in LOSSES]
    out += [(k, l, "sum", False) for k in MODELS for l in LOSSES]
    out += [("mlp", l, r, True) for l in LOSSES for r in ("mean", "sum")]
    out += [("convbn", "ce", "mean", True)]
    return [pytest_param(*c) for c in out]


def pytest_param(kind, loss, reduction, one_batch):
    import pytest

    return pytest.param(kind, loss, reduction, one_batch, id=f"{kind}-{loss}-{reduction}-{'1batch' if one_batch else '7+5+3'}")


# every (model, loss, reduction) on uneven batches 7 + 5 + 3; each loss and reduction also as one batch
GRID = _grid()
