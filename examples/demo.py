"""Train a small CNN for a few seconds on real handwritten digits, then measure its curvature.

The Python API by hand: `python examples/demo.py` (`make demo` runs `curvkit analyze`, the full
report). No network: the digits ship with scikit-learn's wheel.
"""

import time

import torch
from torch import nn

import curvkit as ck
from curvkit import datasets

torch.manual_seed(0)
(x_train, y_train), (x_test, y_test) = datasets.split(*datasets.digits(), test_fraction=0.2, seed=0)

model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
)
loss_fn = nn.CrossEntropyLoss()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
t0 = time.perf_counter()
for epoch in range(8):
    for xb, yb in datasets.batches(x_train, y_train, 64):
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
with torch.no_grad():
    acc = (model(x_test).argmax(1) == y_test).float().mean()
n = sum(p.numel() for p in model.parameters())
print(f"trained a {n:,}-parameter CNN on {len(y_train)} digits in {time.perf_counter() - t0:.1f}s; "
      f"test accuracy {acc:.1%}")

# The Hessian of the mean training loss, over 4 batches of 256 examples, never formed.
data = datasets.batches(x_train, y_train, 256, limit=4)
H = ck.hessian(model, loss_fn, data)
t0 = time.perf_counter()
top = ck.power_iteration(H, max_matvecs=200, tol=1e-3, seed=0)
print(f"top Hessian eigenvalue (sharpness): {top.values[0]:.4f}  "
      f"(residual {top.residuals[0]:.1e}, {top.matvecs} Hessian-vector products, "
      f"{time.perf_counter() - t0:.1f}s, converged={top.converged})")
