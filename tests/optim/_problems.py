"""Tiny problems for the optimizer tests: seeded models, fixed batches, closures."""

import torch
from torch import nn
from torch.func import functional_call

from curvkit.optim import AdaHessian, Sophia

# (name, constructor) for every optimizer/estimator pair, small refresh periods so tests cross the schedule
KINDS = {
    "adahessian": lambda params, **kw: AdaHessian(params, **{"lr": 0.05, "every": 3, **kw}),
    "sophia-h": lambda params, **kw: Sophia(params, **{"lr": 0.02, "every": 3, **kw}),
    "sophia-gnb": lambda params, **kw: Sophia(params, **{"lr": 0.02, "every": 3, "estimator": "gnb", **kw}),
}


def classifier(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def class_batches(n_batches=3, size=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 6, generator=g)
        out.append((x.to(dtype), (x @ w).argmax(1)))
    return out


def class_closure(model, batch):
    x, y = batch

    def closure():
        logits = model(x)
        return nn.functional.cross_entropy(logits.float(), y), logits

    return closure


def flat_hessian(model, loss_of_output):
    """Dense Hessian of ``loss_of_output(model(...))`` w.r.t. the flat parameter vector (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_of_output(lambda x: functional_call(model, parts, (x,)))

    return torch.autograd.functional.hessian(f, flat)
