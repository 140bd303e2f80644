"""The sweep of the optimizer benchmark spread over worker processes sharing one device.

    python -m benchmarks.optim.pool --device cuda --workers 8 --deadline 480 --out DIR [harness options]

The same runs as ``python -m benchmarks.optim`` (every workload × optimizer × learning rate ×
seed, see harness.py), put in one queue ordered seed by seed and, within a seed, rate by rate
with optimizers interleaved, and taken by ``--workers`` processes; each process warms each
(workload, optimizer) up before its first timed run. The models are small, so one process
leaves a GPU mostly idle waiting for kernel launches; several keep it busy. Timings are then
taken under load from the other workers: seconds per step and time-to-target are inflated
for every optimizer alike (the queue keeps all workers busy until its tail), so compare them
as ratios within the run; the per-step cost in isolation (``step_cost``, run alone) is the
clean figure. After ``--deadline`` seconds no new run starts; runs not made are listed in
``results.json`` (``meta.not_run``) and a later call with ``--resume DIR`` makes only those.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from . import step_cost as sc
from .harness import _warmup, report, run_one
from .optimizers import SPECS, heavyball_mode
from .workloads import WORKLOADS


def plan(workloads, optimizers, seeds, n_lrs=None, log=print):
    """The runs as (seed, lr index, workload, optimizer, lr), in queue order."""
    jobs = []
    longest = max((len(SPECS[name].lrs) for name in optimizers), default=0)
    for seed in seeds:
        for k in range(longest):
            for wname in workloads:
                w = WORKLOADS[wname]
                for name in optimizers:
                    spec = SPECS[name]
                    if (spec.needs_likelihood and not w.likelihood) or wname in spec.not_for:
                        continue
                    grid = spec.lrs
                    if n_lrs is not None and n_lrs < len(grid):
                        lo = (len(grid) - n_lrs + 1) // 2
                        grid = grid[lo:lo + n_lrs]
                    if k < len(grid):
                        jobs.append((seed, k, wname, name, grid[k]))
    return jobs


def _worker(rank, device, jobs, results, steps_scale, data_dir, threads):
    torch.set_num_threads(threads)
    dev = torch.device(device)
    warm = set()
    while True:
        try:
            job = jobs.get(timeout=1)
        except queue.Empty:
            continue
        if job is None:
            return
        seed, _, wname, name, lr = job
        w, spec = WORKLOADS[wname], SPECS[name]
        steps = max(w.eval_every, int(round(w.steps * steps_scale)))
        try:
            if (wname, name) not in warm:
                _warmup(w, spec, lr, dev, data_dir)
                warm.add((wname, name))
            r = run_one(w, spec, lr, seed, dev, steps, w.eval_every, None, data_dir)
        except Exception as e:  # a broken peer must not take the pool down
            r = {"workload": wname, "optimizer": name, "lr": lr, "seed": seed,
                 "status": f"error: {type(e).__name__}: {str(e)[:200]}", "error": True}
        r["worker"] = rank
        results.put(r)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=int, default=None)
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--deadline", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--resume", default=None, help="a previous --out: keep its runs, make only the missing ones")
    ap.add_argument("--step-cost", action="store_true",
                    help="first measure the per-step cost and the matrix functions in isolation (alone on the device)")
    ap.add_argument("--cost-steps", type=int, default=50)
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    out = Path(args.out or os.environ.get("OUT") or ".")
    names = [n for n in args.optimizers if SPECS[n].available()[0]]
    skipped = [SPECS[n].available()[1] for n in args.optimizers if n not in names]
    if "adamw" not in names:
        names.insert(0, "adamw")
    jobs = plan(args.workloads, names, range(args.seeds), args.lrs)
    done: list[dict] = []
    extra: dict = {}
    if args.step_cost:  # before the workers start: nothing else on the device
        extra["step_cost"] = sc.step_costs(args.workloads, names, dev, steps=args.cost_steps,
                                           repeats=args.cost_repeats, data_dir=args.data_dir)
        extra["matfun_cost"] = sc.matfun_costs(args.workloads, dev, data_dir=args.data_dir)
    if args.resume:
        rp = Path(args.resume)
        if (rp / "results.json").is_file():
            prev = json.loads((rp / "results.json").read_text())
            extra = {k: prev[k] for k in ("step_cost", "matfun_cost") if prev.get(k)} | extra
            done = [r for wres in prev["workloads"].values() for r in wres["runs"]]
        else:  # a part killed before its report: its runs as they came in
            done = [json.loads(line) for line in (rp / "runs.jsonl").read_text().splitlines() if line.strip()]
        done = [r for r in done if not r.get("error")]
        have = {(r["seed"], r["workload"], r["optimizer"], r["lr"]) for r in done}
        jobs = [j for j in jobs if (j[0], j[2], j[3], j[4]) not in have]
    print(f"{len(jobs)} runs on {args.workers} workers", flush=True)
    ctx = mp.get_context("spawn")
    q_jobs, q_res = ctx.Queue(), ctx.Queue()
    for j in jobs:
        q_jobs.put(j)
    procs = [ctx.Process(target=_worker, args=(i, args.device, q_jobs, q_res, args.steps_scale, args.data_dir, args.threads))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    got, started_stop = [], False
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "runs.jsonl").open("w")
    while len(got) < len(jobs):
        if args.deadline and time.perf_counter() - t_start > args.deadline + 120:
            print("runs still going 120 s after the deadline: stopped", flush=True)
            break
        if args.deadline and not started_stop and time.perf_counter() - t_start > args.deadline:
            while True:  # drain the queue: runs already started finish, no new one starts
                try:
                    q_jobs.get_nowait()
                except queue.Empty:
                    break
            started_stop = True
        try:
            r = q_res.get(timeout=5)
        except queue.Empty:
            if started_stop and not any(p.is_alive() for p in procs):
                break
            if started_stop:
                for _ in procs:
                    q_jobs.put(None)
            continue
        got.append(r)
        log.write(json.dumps(r, default=float) + "\n")
        log.flush()
        ttt = f"{r['time_to_target_s']:.2f}s/{r['steps_to_target']}" if r.get("steps_to_target") else "—"
        print(f"[{len(got)}/{len(jobs)} {time.perf_counter() - t_start:5.0f}s w{r['worker']}] {r['workload']:13s} "
              f"{r['optimizer']:14s} lr {r['lr']:<7g} seed {r['seed']} final {r.get('final_metric', float('nan')):.4f} "
              f"target {ttt:>12s} {r.get('step_ms', float('nan')):.2f} ms/step {r['status'] if r['status'] != 'ok' else ''}",
              flush=True)
    log.close()
    for _ in procs:
        q_jobs.put(None)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    have = {(r["seed"], r["workload"], r["optimizer"], r["lr"]) for r in got}
    not_run = [j for j in jobs if (j[0], j[2], j[3], j[4]) not in have]
    errors = [r for r in got if r.get("error")]
    runs = done + [r for r in got if not r.get("error")]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
        "seeds": list(range(args.seeds)), "quick": False, "skipped": skipped, "heavyball_compile_mode": heavyball_mode(),
        "memory": ("CUDA max_memory_allocated per run (peak_mb) and optimizer state bytes (state_mb)" if dev.type == "cuda"
                   else "CPU: optimizer state bytes only (state_mb)")
                  + f"; timings taken with {args.workers} worker processes sharing the device",
        "workers": args.workers, "not_run": not_run,
        "errors": [f"{r['workload']} {r['optimizer']} lr {r['lr']} seed {r['seed']}: {r['status']}" for r in errors],
    }
    results = {"meta": meta, "workloads": {}, **extra}
    for wname in args.workloads:
        w = WORKLOADS[wname]
        results["workloads"][wname] = {"metric": w.metric, "target": w.target, "higher_is_better": w.higher_is_better,
                                       "steps": max(w.eval_every, int(round(w.steps * args.steps_scale))),
                                       "eval_every": w.eval_every, "runs": [r for r in runs if r["workload"] == wname]}
    res = report(results, out)
    print(res["markdown"])
    print(f"{len(not_run)} runs not made, {len(errors)} errors; {time.perf_counter() - t_start:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
