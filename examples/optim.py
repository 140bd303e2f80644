"""Train a small CNN on real handwritten digits with AdaHessian and Sophia: `python examples/optim.py`.

Two ways to drive them. torch's loop works with one change, `loss.backward(create_graph=True)`,
so that the Hessian-vector products can go through the gradient's graph (AdaHessian, Sophia-H).
Or pass a closure that runs the forward pass and RETURNS the loss (no backward): the optimizer
differentiates it itself, with create_graph=True only on the steps that refresh the Hessian
diagonal, which is cheaper; Sophia-G needs this form, returning `(loss, outputs)`, since it samples
targets from the outputs. No network: the digits ship with scikit-learn's wheel.
"""

import torch
from torch import nn

from curvkit import datasets
from curvkit.optim import AdaHessian, Sophia


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train(name, make_opt, steps=60, torch_loop=False):
    (x, y), (xt, yt) = datasets.split(*datasets.digits(), test_fraction=0.2, seed=0)
    model = make_model()
    opt = make_opt(model.parameters())
    data = datasets.batches(x, y, batch_size=128)
    for step in range(steps):
        xb, yb = data[step % len(data)]
        if torch_loop:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward(create_graph=True)  # the graph the Hessian-vector products go through
            opt.step()
            continue

        def closure():
            logits = model(xb)
            return nn.functional.cross_entropy(logits, yb), logits  # logits: for Sophia-G's sampled targets

        loss = opt.step(closure)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"{name:24s} last batch loss {loss.item():.3f}  held-out accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    train("AdaHessian", lambda p: AdaHessian(p, lr=0.1, every=2, seed=0))
    train("AdaHessian (torch loop)", lambda p: AdaHessian(p, lr=0.1, every=2, seed=0), torch_loop=True)
    train("Sophia-H", lambda p: Sophia(p, lr=0.01, weight_decay=0.0, every=10, seed=0))
    train("Sophia-G", lambda p: Sophia(p, lr=0.01, weight_decay=0.0, every=10, estimator="gnb", seed=0))
