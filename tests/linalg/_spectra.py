"""Symmetric test matrices with known spectra, and a tiny network's curvature."""

from __future__ import annotations

import torch

F64 = torch.float64


def sym(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = len(lam)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def spectrum(name: str, n: int = 300, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "decaying":
        return torch.exp(-torch.arange(n, dtype=F64) / 30)
    if name == "clustered":  # a tight top cluster, a gap, then a bulk
        top = torch.tensor([10, 9.9, 9.8, 9.7, 9.6, 9.5, 5.0], dtype=F64)
        return torch.cat([top, 4 * torch.rand(n - len(top), generator=g, dtype=F64)])
    if name == "indefinite":
        return torch.linspace(-3, 5, n, dtype=F64) ** 3 / 10
    if name == "lowrank":  # a few large eigenvalues on a noise floor of both signs
        top = torch.tensor([50, 30, 20, 10, 8, 6, 5], dtype=F64)
        return torch.cat([top, 0.1 * torch.randn(n - len(top), generator=g, dtype=F64)])
    raise KeyError(name)


SPECTRA = ("decaying", "clustered", "indefinite", "lowrank")


def tiny_mlp_problem():
    """A 259-parameter tanh MLP on 3 classes, float64, and its data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (64,), generator=g)
    return model, torch.nn.CrossEntropyLoss(), (x, y)
