"""Trained models for the compression benchmarks, built once per (workload, seed) and shared by
every ``benchmarks/compress_*.py`` script: the optimizer benchmark's MNIST-5k CNN and char-level
transformer (``benchmarks/optim/workloads.py``), trained with Adam.

``trained(name, seed, device, steps)`` -> :class:`Trained` with the model, the loss, calibration
batches drawn from the training split, held-out batches and ``evaluate(model) -> dict`` (held-out
loss, and accuracy for the CNN). The weights are cached under ``benchmarks/results/.cache`` (or
``$COMPRESS_CACHE``) so the scripts train each model once.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.optim.workloads import WORKLOADS, _mnist, _text_tensors

STEPS = {"mnist_cnn": 600, "char_lm": 1500}
LR = {"mnist_cnn": 3e-3, "char_lm": 3e-3}


class FlatCE(nn.Module):
    """Cross-entropy over ``(B, T, V)`` logits and ``(B, T)`` targets (the char LM), or
    ``(B, V)`` and ``(B,)``: one loss function for both workloads."""

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass
class Trained:
    name: str
    seed: int
    model: nn.Module
    loss_fn: nn.Module
    calibration: list[tuple[Tensor, Tensor]]   # training-split batches (what a user calibrates on)
    heldout: list[tuple[Tensor, Tensor]]
    evaluate: Callable[[nn.Module], dict] = field(repr=False)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)


def _cache_dir() -> Path:
    d = Path(os.environ.get("COMPRESS_CACHE", Path(__file__).parent / "results" / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _splits(name: str, device, calib_batches: int, batch_size: int):
    gen = torch.Generator().manual_seed(123)
    if name == "mnist_cnn":
        (xtr, ytr), (xte, yte) = _mnist(None)
        idx = torch.randperm(len(ytr), generator=gen)[: calib_batches * batch_size]
        calib = [(xtr[i].to(device), ytr[i].to(device)) for i in idx.split(batch_size)]
        held = [(x.to(device), y.to(device)) for x, y in zip(xte.split(250), yte.split(250))]
        return calib, held
    train, val = _text_tensors(None)
    context = 32
    ar = torch.arange(context + 1)

    def windows(text: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
        starts = torch.randint(0, len(text) - context - 1, (n,), generator=gen)
        w = text[starts[:, None] + ar]
        return [(c[:, :-1].to(device), c[:, 1:].to(device)) for c in w.split(batch_size)]

    return windows(train, calib_batches * batch_size), windows(val, 1024)


def trained(name: str, seed: int = 0, device="cpu", steps: int | None = None, calib_batches: int = 8,
            batch_size: int = 64) -> Trained:
    """The workload's model trained ``steps`` Adam steps (cached), with calibration and held-out
    batches. Cost: ``steps`` training steps the first time, a file read after."""
    steps = STEPS[name] if steps is None else steps
    task = WORKLOADS[name].build(seed, torch.device(device))
    model = task.model
    path = _cache_dir() / f"{name}-seed{seed}-steps{steps}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=LR[name])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for i in range(steps):
            loss, _ = task.loss(task.batch(i))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        torch.save(model.state_dict(), path)
    model.eval()
    calib, held = _splits(name, device, calib_batches, batch_size)
    loss_fn = FlatCE()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was = m.training
        m.eval()
        total, correct, count = 0.0, 0, 0
        for x, y in held:
            out = m(x)
            total += float(loss_fn(out, y)) * y.numel()
            correct += int((out.argmax(-1) == y).sum())
            count += y.numel()
        m.train(was)
        return {"loss": total / count, "accuracy": correct / count}

    return Trained(name, seed, model, loss_fn, calib, held, evaluate)


__all__ = ["trained", "Trained", "FlatCE", "STEPS"]
