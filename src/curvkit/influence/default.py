"""The embedded default of ``curvkit influence``: the default digits CNN
(:func:`curvkit.analyze.default.make_model`) trained on real 8x8 digits of which 10% of the
training labels were flipped (seeded), so that the self-influence ranking has mislabels to find."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import datasets
from ..analyze.default import train

Batch = tuple[Tensor, Tensor]


@dataclass
class DefaultProblem:
    """What :func:`build` returns."""

    model: nn.Module
    loss_fn: Any
    data: list[Batch]
    query: Batch
    flipped: Tensor
    description: str
    train_seconds: float


def flip_labels(y: Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(y with round(fraction * n) labels changed to another class chosen uniformly, the sorted
    indices changed)``; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    idx = torch.randperm(n, generator=gen)[: int(round(fraction * n))].sort().values
    shift = torch.randint(1, num_classes, (len(idx),), generator=gen)
    out = y.clone()
    out[idx] = (y[idx] + shift) % num_classes  # never the true class
    return out, idx


def build(seed: int = 0, fast: bool = False, flip: float = 0.1, progress: bool | None = None) -> DefaultProblem:
    """Train the default CNN on digits with ``flip`` of its training labels flipped.

    Training set: 1,437 images (the first 300 with ``fast``), scored in batches of 256; queries:
    the first 8 held-out images (4 with ``fast``), with their true labels.
    Cost: 15 epochs of Adam (25 with ``fast``): a second or two on a CPU.
    """
    x, y = datasets.digits()
    (x_tr, y_tr), (x_te, y_te) = datasets.split(x, y, test_fraction=0.2, seed=seed)
    n, epochs, nq = (300, 25, 4) if fast else (len(y_tr), 15, 8)
    x_tr, y_tr = x_tr[:n], y_tr[:n]
    y_noisy, flipped = flip_labels(y_tr, flip, 10, seed=seed)
    model, seconds = train(x_tr, y_noisy, epochs=epochs, seed=seed, progress=progress)
    params = sum(p.numel() for p in model.parameters())
    desc = (f"default: a {params:,}-parameter CNN trained with Adam for {epochs} epochs ({seconds:.1f}s) on {n:,} "
            f"real 8x8 handwritten digits (scikit-learn) with {len(flipped)} labels ({flip:.0%}) flipped "
            f"(seed {seed}); queries: {nq} held-out digits")
    return DefaultProblem(model, nn.CrossEntropyLoss(), datasets.batches(x_tr, y_noisy, 256), (x_te[:nq], y_te[:nq]),
                          flipped, desc, seconds)
