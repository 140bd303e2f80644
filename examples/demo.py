"""The Python API by hand on the embedded default (a small CNN trained on real digits).

`python examples/demo.py`; `make demo` runs `curvkit analyze`, the full report built from the
same calls. No network: the digits ship with scikit-learn's wheel.
"""

import time

import curvkit as ck
from curvkit.analyze import default

problem = default.build(seed=0)  # the trained model, its loss, 4 batches of 256 training digits
print(problem.description)

# The Hessian of the mean training loss over those batches, never formed.
H = ck.hessian(problem.model, problem.loss_fn, problem.data)
t0 = time.perf_counter()
top = ck.eigenvalues(H, k=3, seed=0)
tr = ck.trace(H, probes=30, seed=0)
print(f"top Hessian eigenvalues {[round(float(v), 3) for v in top.values]} "
      f"(max residual {float(top.residuals.max()):.1e}, {top.matvecs} products, converged={top.converged})")
print(f"trace {tr.value:.1f} ± {tr.stderr:.1f} ({tr.matvecs} products); {time.perf_counter() - t0:.1f}s in all")
