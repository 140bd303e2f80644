"""Train a small CNN on real handwritten digits with AdaHessian and Sophia: `python examples/optim.py`.

The ordinary loop changes in one place: instead of zero_grad / backward / step, pass a closure
that runs the forward pass and RETURNS the loss (no backward); the optimizer differentiates it
itself, with create_graph=True only on the steps that refresh the Hessian diagonal.
No network: the digits ship with scikit-learn's wheel.
"""

import torch
from torch import nn

from curvkit import datasets
from curvkit.optim import AdaHessian, Sophia


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train(name, make_opt, steps=60):
    (x, y), (xt, yt) = datasets.split(*datasets.digits(), test_fraction=0.2, seed=0)
    model = make_model()
    opt = make_opt(model.parameters())
    data = datasets.batches(x, y, batch_size=128)
    for step in range(steps):
        xb, yb = data[step % len(data)]

        def closure():
            logits = model(xb)
            return nn.functional.cross_entropy(logits, yb), logits  # logits: for Sophia's GNB estimator

        loss = opt.step(closure)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"{name:12s} last batch loss {loss.item():.3f}  held-out accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    train("AdaHessian", lambda p: AdaHessian(p, lr=0.1, update_each=2, seed=0))
    train("Sophia-H", lambda p: Sophia(p, lr=0.01, weight_decay=0.0, update_each=10, seed=0))
    train("Sophia-G", lambda p: Sophia(p, lr=0.01, weight_decay=0.0, update_each=10, estimator="gnb", seed=0))
