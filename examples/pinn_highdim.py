"""Train a physics-informed network for a 100-dimensional Poisson equation with a randomized
Laplacian (STDE by default, or Hutchinson), on the CPU in well under a minute.

    -Δu = f  on the unit ball in R^d,  u = u* on its sphere,
    u*(x) = |x|^2 / (2d) + sin(s / sqrt(d)) with s = sum_i x_i,  so  f = -Δu* = -(1 - sin(s / sqrt(d))).

The loss is the mean squared PDE residual at random interior points plus the mean squared
boundary error at random points of the sphere, with ``Δu`` from
``ck.laplacian(u, x, method="stde", probes=16)``: 16 sampled dimensions of 100 per step (the
exact forward Laplacian would carry all 100). Prints the relative L2 error against the exact
solution on held-out interior points every 100 steps.

    PYTHONPATH=src python examples/pinn_highdim.py [--d 100] [--method stde|hutchinson] [--steps 600]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import curvkit as ck


def exact(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return (x * x).sum(1) / (2 * d) + torch.sin(x.sum(1) / math.sqrt(d))


def source(x: torch.Tensor) -> torch.Tensor:
    """f = -Δu*: Δ(|x|^2 / 2d) = 1 and Δ sin(s / sqrt d) = -sin(s / sqrt d) (d terms of 1/d)."""
    d = x.shape[1]
    return -(1 - torch.sin(x.sum(1) / math.sqrt(d)))


def ball(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """n points uniform in the unit ball of R^d."""
    z = torch.randn(n, d, generator=gen)
    r = torch.rand(n, 1, generator=gen) ** (1 / d)
    return r * z / z.norm(dim=1, keepdim=True)


def mlp(d: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=100)
    p.add_argument("--method", default="stde", choices=["stde", "hutchinson", "exact"])
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = mlp(args.d)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    test = ball(2000, args.d, torch.Generator().manual_seed(1))
    u_test = exact(test)
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        x = ball(args.batch, args.d, gen)
        edge = torch.randn(args.batch, args.d, generator=gen)
        edge = edge / edge.norm(dim=1, keepdim=True)
        lap = ck.laplacian(model, x, method=args.method, probes=args.probes, seed=gen)
        loss = (lap.value + source(x)).pow(2).mean() + (model(edge)[:, 0] - exact(edge)).pow(2).mean()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                err = float((model(test)[:, 0] - u_test).norm() / u_test.norm())
            print(f"step {step:4d}  loss {loss.item():.3e}  relative L2 error {err:.2e}  ({time.perf_counter() - t0:.1f} s)")
        if step == args.steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return err


if __name__ == "__main__":
    main()
