"""Where an optimizer's step goes on a launch-bound GPU model: host time vs device time, and the
number of kernels, for one full training step (forward, backward, optimizer) of each optimizer.

    python -m benchmarks.optim.profile_step --device cuda --workloads mnist_cnn

Per optimizer: ``wall_ms`` (steps run back to back, one sync at the end: the throughput figure of
step_cost.py), ``host_ms`` (the time for the Python call of one step to return, after a sync, so
the launch queue starts empty: the CPU side of the step) and ``kernels`` (CUDA kernels per step,
from torch.profiler). When ``host_ms`` is close to ``wall_ms`` the step is launch-bound: fewer
launches and less Python, not fewer flops, make it faster. Cost: about 80 steps per optimizer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .._timing import sync
from .optimizers import SPECS, make_stepper
from .step_cost import COST_LR, variants
from .workloads import WORKLOADS


def profile_steps(workload_names, opt_names, device, steps: int = 40, data_dir=None, log=print) -> dict:
    out = {}
    for wname in workload_names:
        w = WORKLOADS[wname]
        out[wname] = {}
        for label, spec, refresh in variants(opt_names, w):
            task = w.build(0, device, data_dir=data_dir)
            opt = spec.make(task.model, COST_LR, refresh=refresh, seed=0)
            if spec.schedule_free:
                opt.train()
            step = make_stepper(spec, opt, task)
            for i in range(5):
                step(i)
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync(device)
            wall = (time.perf_counter() - t0) / steps
            host = 0.0
            for i in range(steps):
                sync(device)
                t0 = time.perf_counter()
                step(i)
                host += time.perf_counter() - t0
            host /= steps
            kernels = float("nan")
            if str(device).startswith("cuda"):
                n = 10  # a multiple of every refresh period in use
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for i in range(n):
                        step(i)
                    sync(device)
                kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / n
            out[wname][label] = {"wall_ms": round(wall * 1e3, 3), "host_ms": round(host * 1e3, 3),
                                 "kernels": kernels}
            log(f"{wname:13s} {label:26s} wall {wall * 1e3:7.2f} ms  host {host * 1e3:7.2f} ms  kernels {kernels:6.0f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=["mnist_cnn"], choices=list(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = profile_steps(args.workloads, args.optimizers, args.device, args.steps, args.data_dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
