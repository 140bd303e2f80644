"""curvkit's rows of vs_pyhessian.py alone (ResNet-20, 4 x 256, fresh operator per row), to check
the method="auto" measurement after a change without re-running the peers. Prints H.choice."""
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[2]))
import curvkit as ck  # noqa: E402
from models import cifar_like, resnet20  # noqa: E402

dev = torch.device("cuda")
model, data = resnet20(dev, 0), cifar_like(4, 256, dev, 0)
loss = nn.CrossEntropyLoss()
H = ck.hessian(model, loss, data)
v = torch.randn(H.shape[0], device=dev)
t = time.perf_counter(); H @ v; torch.cuda.synchronize(); print(f"first product (with the choice) {time.perf_counter() - t:.2f} s")
print("choice", {k: (v_ if isinstance(v_, str) else {a: round(b, 4) for a, b in v_.items()}) for k, v_ in H.choice.items()})
rows = [("top-1 block 1", lambda A: ck.eigenvalues(A, k=1, tol=1e-3)),
        ("top-1 block 4", lambda A: ck.eigenvalues(A, k=1, tol=1e-3, block_size=4)),
        ("top-5 block 1", lambda A: ck.eigenvalues(A, k=5, tol=1e-3)),
        ("top-5 block 4", lambda A: ck.eigenvalues(A, k=5, tol=1e-3, block_size=4)),
        ("trace hutchinson 39", lambda A: ck.trace(A, method="hutchinson", probes=39)),
        ("density 100 x 1", lambda A: ck.spectral_density(A, iterations=100, probes=1))]
for name, fn in rows:
    torch.cuda.synchronize(); t = time.perf_counter()
    A = ck.hessian(model, loss, data)
    r = fn(A)
    torch.cuda.synchronize()
    extra = getattr(r, "matvecs", None)
    print(f"{name:22s} {time.perf_counter() - t:6.2f} s  products {extra}  chose {A.choice['chosen']}", flush=True)
