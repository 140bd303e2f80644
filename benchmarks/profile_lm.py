"""Where a Hessian product's time and a top-k's memory go on the byte-level GPT of ``scale_lm.py``.

    python benchmarks/profile_lm.py --device cuda --size 85m

Prints, for one batch: the wall time and the summed kernel time (GPU busy share) of a gradient,
a double-backward H@v and a forward-over-reverse H@v, and the aten ops that take the most kernel
time in each (``torch.profiler``); the cost of re-differentiating a retained gradient graph (what
a product would cost if the first backward were kept); then the memory of a top-1 by phase (the
method choice, each product) and the graph-pool memory still held after the choice; then the
residual trace of a top-5 (when the wanted pairs converged and when the cluster guard let it
stop).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import curvkit as ck  # noqa: E402
from curvkit.linalg import lanczos  # noqa: E402
from scale_lm import GIB, build, lm_loss, text_batches  # noqa: E402

hessian_mod = sys.modules["curvkit.operators.hessian"]


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def kernel_table(name, fn, rows):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ka) / 1e6
    wall = timed(fn, 2)
    kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n### {name}: wall {wall * 1e3:.1f} ms, kernel time {busy * 1e3:.1f} ms "
          f"(GPU busy {busy / wall:.0%}), {kernels} kernels", flush=True)
    print(ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="85m")
    ap.add_argument("--rows", type=int, default=22)
    ap.add_argument("--skip-top5", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = build(args.size, "math", dev, 30, 8, 512)
    data, _ = text_batches(4, 8, 512, dev, seed=1)
    x, y = data[0]
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dev)
    vs = list(torch.split(v, [p.numel() for p in params]))
    vs = [t.view_as(p) for t, p in zip(vs, params)]
    print(f"# {args.size}: {n:,} parameters, one batch of 8 x 512, {torch.cuda.get_device_name()}", flush=True)
    if not args.skip_profile:
        profile_products(model, x, y, v, vs, params, args.rows)
    top_k(model, data, args.skip_top5)


def profile_products(model, x, y, v, vs, params, rows):
    def gradient():
        torch.autograd.grad(lm_loss(model(x), y), params)

    def double_backward():
        g = torch.autograd.grad(lm_loss(model(x), y), params, create_graph=True)
        torch.autograd.grad(g, params, vs)

    Hd = ck.hessian(model, lm_loss, [(x, y)], method="double-backward", cuda_graphs=False)
    Hf = ck.hessian(model, lm_loss, [(x, y)], method="forward-over-reverse", cuda_graphs=False)
    t_g = kernel_table("gradient (torch)", gradient, rows)
    t_d = kernel_table("H@v double backward (plain torch)", double_backward, rows)
    t_cd = kernel_table("H@v curvkit double-backward", lambda: Hd @ v, rows)
    t_cf = kernel_table("H@v curvkit forward-over-reverse (eager)", lambda: Hf @ v, rows)
    print(f"\nratios to the gradient: torch double backward {t_d / t_g:.2f}, curvkit double backward "
          f"{t_cd / t_g:.2f}, curvkit forward-over-reverse {t_cf / t_g:.2f}", flush=True)

    # a retained first-order graph: what each further product costs
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    g = torch.autograd.grad(lm_loss(model(x), y), params, create_graph=True)
    held = torch.cuda.memory_allocated() - base
    t_again = timed(lambda: torch.autograd.grad(g, params, vs, retain_graph=True))
    print(f"retained graph: holds {held / GIB:.2f} GiB, peak {(torch.cuda.max_memory_allocated() - base) / GIB:.2f}"
          f" GiB; each further product {t_again * 1e3:.1f} ms = {t_again / t_g:.2f} gradients", flush=True)
    del g, Hd, Hf


def top_k(model, data, skip_top5):
    # top-1 memory by phase
    log = []
    choose, matmat = hessian_mod.HessianOperator._choose, hessian_mod.HessianOperator._matmat

    def phase(name, fn):
        def wrapped(self, *a, **k):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn(self, *a, **k)
            torch.cuda.synchronize()
            pools = sum(s["allocated_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
            log.append((name, time.perf_counter() - t0, before / GIB, torch.cuda.max_memory_allocated() / GIB,
                        torch.cuda.memory_allocated() / GIB, pools / GIB))
            return out
        return wrapped

    hessian_mod.HessianOperator._choose = phase("choose", choose)
    hessian_mod.HessianOperator._matmat = phase("product", matmat)
    for keep in (False, True):
        log.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = ck.eigenvalues(ck.hessian(model, lm_loss, data, retain_graphs=keep), k=1, tol=1e-3)
        torch.cuda.synchronize()
        print(f"\n### top-1 tol 1e-3 over 4 batches, retain_graphs={keep}: {time.perf_counter() - t0:.2f} s, "
              f"{r.matvecs} products, value {float(r.values[0]):.4f}, peak {max(row[3] for row in log):.2f} GiB",
              flush=True)
        print("phase      seconds  allocated before  peak  after  graph pools (GiB)")
        for row in log:
            print(f"{row[0]:9s} {row[1]:7.3f} {row[2]:8.2f} {row[3]:8.2f} {row[4]:7.2f} {row[5]:7.2f}")
    hessian_mod.HessianOperator._choose, hessian_mod.HessianOperator._matmat = choose, matmat
    if skip_top5:
        return

    # top-5: when the wanted pairs converge, when the guard lets it stop
    trace, calls = [], []

    class Bar:
        def __init__(self, *a, **k):
            pass

        def update(self, b):
            pass

        def set_postfix(self, **k):
            trace.append(k["rel_residual"])

        def close(self):
            pass

    may_stop = lanczos._may_stop

    def logged(theta, res, order, k, m, *a):
        out = may_stop(theta, res, order, k, m, *a)
        calls.append((m, out, [round(float(t), 3) for t in theta[order[: k + 2]]]))
        return out

    lanczos.progress_bar, lanczos._may_stop = Bar, logged
    t0 = time.perf_counter()
    r = ck.eigenvalues(ck.hessian(model, lm_loss, data), k=5, tol=1e-3)  # graphs kept (the default)
    print(f"\n### top-5 tol 1e-3: {time.perf_counter() - t0:.2f} s, {r.matvecs} products, "
          f"{[round(float(t), 3) for t in r.values]}", flush=True)
    print("relative residual of the wanted pairs by product:", " ".join(trace))
    print("cluster guard calls (basis size, stop?, leading Ritz values):")
    for c in calls:
        print("  ", c)


if __name__ == "__main__":
    main()
