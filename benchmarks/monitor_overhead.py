"""Overhead of monitoring the top-1 sharpness every 100 steps, as a fraction of training time.

Workloads: the MNIST-5k CNN and the char-LM of ``benchmarks/optim`` (``workloads.py``), trained
with Adam (lr 1e-3). The monitor measures the Hessian's top eigenvalue (warm-started, tol 1e-3) on
a fixed probe set of the first ``--probe-batches`` training batches (1 and 4: 64 / 256 images,
16 / 64 text windows), every 100 steps, with and without the exploring column (``explore``). In ONE run
we time the training steps and the monitor's measurements separately (the monitor's own
``Record.seconds``); the overhead is curvature seconds / training seconds. Goals (issue 14):
<= 10% on the CPU, <= 5% on the GPU, and <= 3 block products per warm re-measurement.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/monitor_overhead.py              # CPU, full
    PYTHONPATH=$PWD/src:$PWD python benchmarks/monitor_overhead.py --device cuda
    PYTHONPATH=$PWD/src:$PWD python benchmarks/monitor_overhead.py --quick      # smoke test

Writes ``monitor_overhead.json`` under ``$OUT`` (or ``benchmarks/results/monitor/``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.optim.workloads import WORKLOADS
from curvkit.model.losses import CrossEntropy
from curvkit.monitor import CurvatureMonitor


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(name: str, device: str, steps: int, every: int, probe_batches: int, explore: int, tol: float,
            seed: int = 0) -> dict:
    task = WORKLOADS[name].build(seed, device)
    model = task.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = [task.batch(i) for i in range(probe_batches)]  # fixed: materialised once
    loss_fn = CrossEntropy(class_dim=-1)  # (batch, [time,] classes) logits
    mon = CurvatureMonitor(model, loss_fn, probe, every=every, optimizer=opt, explore=explore, seed=seed,
                           tol=tol, progress=False)
    train_s = 0.0
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        b = task.batch(i)
        loss, _ = task.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        train_s += time.perf_counter() - t0
        mon.step()
    curv_s = sum(r.seconds["total"] for r in mon.history)
    warm = mon.history[1:]
    return {
        "workload": name, "device": device, "steps": steps, "every": every, "probe_batches": probe_batches,
        "probe_examples": sum(int(y.shape[0]) for _, y in probe), "explore": explore, "tol": tol,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s, "curvature_seconds": curv_s, "overhead": curv_s / train_s,
        "measurements": len(mon.history), "first_products": mon.history[0].products["sharpness"],
        "warm_products": [r.products["sharpness"] for r in warm],
        "warm_block_products": [r.info["sharpness_block_products"] for r in warm],
        "sharpness": [r.values["sharpness"][0] for r in mon.history],
        "residuals": [r.errors["sharpness"][0] for r in mon.history],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="training steps per workload (default 1000; quick 200)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--probe-batches", default="1,4", help="probe-set sizes in training batches (comma-separated)")
    ap.add_argument("--workloads", default="mnist_cnn,char_lm")
    ap.add_argument("--tol", default="1e-3,1e-2", help="Lanczos tolerances (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="a short CPU smoke test")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    steps = args.steps or (200 if args.quick else 1000)
    rows = []
    for name in args.workloads.split(","):
        for pb in (int(v) for v in args.probe_batches.split(",")):
            for tol in (float(v) for v in args.tol.split(",")):
                for explore in (1, 0):  # the default (one exploring column) and the bare warm start
                    rows.append(run_one(name, args.device, steps, args.every, pb, explore, tol))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    meta = {"date": str(date.today()), "device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": "PYTHONPATH=$PWD/src:$PWD python benchmarks/monitor_overhead.py "
                       + " ".join(a for a in os.sys.argv[1:])}
    print(f"# monitor overhead — {meta['device']}, torch {meta['torch']}, {meta['date']}")
    print(f"{'workload':<10} {'tol':>6} {'explore':>7} {'steps':>6} {'probe':>6} {'train s':>8} {'curv s':>7} {'overhead':>8} "
          f"{'1st prod':>8} {'warm prod (mean)':>16} {'warm blocks (max)':>17}")
    for r in rows:
        wp = sum(r["warm_products"]) / max(1, len(r["warm_products"]))
        wb = max(r["warm_block_products"], default=0)
        print(f"{r['workload']:<10} {r['tol']:>6g} {r['explore']:>7} {r['steps']:>6} {r['probe_examples']:>6} {r['train_seconds']:>8.2f} "
              f"{r['curvature_seconds']:>7.2f} {r['overhead']:>7.1%} {r['first_products']:>8} {wp:>16.1f} {wb:>17}")
    out = Path(os.environ.get("OUT") or "benchmarks/results/monitor")
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / 'monitor_overhead.json'}")


if __name__ == "__main__":
    main()
