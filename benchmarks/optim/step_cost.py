"""Per-step cost of each optimizer in isolation, as a ratio to AdamW on the same workload.

    python -m benchmarks.optim.step_cost --device cuda

Each variant (an optimizer, and for the curvature optimizers each refresh period: every step,
AdaHessian's default, and every 10 steps, Sophia's default) gets a fresh model and optimizer at
learning rate ``COST_LR`` (1e-6: the cost does not depend on it, and no variant diverges),
``warmup`` untimed steps, then ``steps`` timed steps (a multiple of 10, so a 10-step refresh
period is sampled whole), synchronised once at the end. Variants are timed in turn and the
round repeated ``repeats`` times; the figure is the median round. Goal (issue 6): curvkit's
AdaHessian/Sophia with the diagonal refreshed every 10 steps cost ≤ 1.3× an AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import torch

from .._timing import sync, timeit
from .optimizers import SPECS, make_stepper
from .workloads import WORKLOADS


COST_LR = 1e-6


_CHECKED = ("curvkit.optim._base",)  # the step protocol: every optimizer's one finiteness check
NO_READ = " [check not read]"


@contextlib.contextmanager
def finiteness_not_read():
    """Ablation: curvkit's finiteness check still runs on the device but its flag is never read
    back, so the step has no host sync. Measures what the sync costs; unsafe outside a benchmark."""
    from curvkit.optim._base import non_finite_flag

    def launched_not_read(tensors):
        non_finite_flag(tensors)
        return True

    with contextlib.ExitStack() as stack:
        for mod in _CHECKED:
            stack.enter_context(mock.patch(f"{mod}.all_finite", launched_not_read))
        yield


def variants(opt_names, workload, ablate_sync: bool = False):
    """``(label, spec, refresh)`` for every importable optimizer that applies to ``workload``; with
    ``ablate_sync`` each curvkit variant again with the finiteness flag not read (label + NO_READ)."""
    out = []
    for name in opt_names:
        spec = SPECS[name]
        if (not spec.available()[0] or (spec.needs_likelihood and not workload.likelihood)
                or workload.name in spec.not_for):
            continue
        if spec.refreshes:
            for r in spec.refreshes:
                out.append((f"{name} (refresh {r})", spec, r))
        else:
            out.append((name, spec, None))
    if ablate_sync:
        out += [(label + NO_READ, spec, r) for label, spec, r in list(out) if spec.package == "curvkit.optim"]
    return out


def step_costs(workload_names, opt_names, device, steps: int = 50, warmup: int = 3, repeats: int = 3,
               data_dir=None, log=print, ablate_sync: bool = False) -> dict:
    """``{workload: {variant: {"ms": ..., "ratio_to_adamw": ...}}}``; costs ``repeats * (warmup +
    steps)`` optimizer steps per variant."""
    steps = max(10, 10 * round(steps / 10))
    opt_names = ["adamw"] + [o for o in opt_names if o != "adamw"]
    out = {}
    for wname in workload_names:
        w = WORKLOADS[wname]
        vs = variants(opt_names, w, ablate_sync)
        times = {label: [] for label, _, _ in vs}
        for _ in range(repeats):
            for label, spec, refresh in vs:
                task = w.build(0, device, data_dir=data_dir)
                # the cost does not depend on the rate; a tiny one keeps every variant finite
                opt = spec.make(task.model, COST_LR, refresh=refresh, seed=0)
                if spec.schedule_free:
                    opt.train()
                step = make_stepper(spec, opt, task)
                ablation = finiteness_not_read() if label.endswith(NO_READ) else contextlib.nullcontext()
                try:
                    with ablation:
                        for i in range(warmup):
                            step(i)
                        sync(device)
                        t0 = time.perf_counter()
                        for i in range(warmup, warmup + steps):
                            step(i)
                        sync(device)
                except Exception as e:  # recorded as no figure, the other variants still timed
                    log(f"step cost  {wname:13s} {label:28s} failed: {type(e).__name__}: {str(e)[:100]}")
                    times[label].append(float("nan"))
                    continue
                times[label].append((time.perf_counter() - t0) / steps)
        base = statistics.median(times["adamw"])
        out[wname] = {label: {"ms": round(statistics.median(t) * 1e3, 3),
                              "ratio_to_adamw": round(statistics.median(t) / base, 3)} for label, t in times.items()}
        for label, r in out[wname].items():
            log(f"step cost  {wname:13s} {label:28s} {r['ms']:8.2f} ms  {r['ratio_to_adamw']:5.2f} x AdamW")
    return out


def matfun_costs(workload_names, device, refresh: int = 10, data_dir=None, log=print) -> dict:
    """The matrix functions of one step in isolation, per workload: Muon's Newton-Schulz on every
    matrix it orthogonalises, one call per matrix (per step; curvkit's Muon batches matrices of one
    shape into one call, so this bounds its cost from above), and the ``eigh`` of every Shampoo/SOAP factor (per
    refresh, and amortised over ``refresh`` steps), next to one AdamW step (forward, backward,
    update) on the same model. Cost: about 30 calls of each."""
    from curvkit.approx.matfun import newton_schulz, sym_eigh

    from .optimizers import muon_split

    out = {}
    for wname in workload_names:
        w = WORKLOADS[wname]
        task = w.build(0, device, data_dir=data_dir)
        mats = [p.detach().reshape(p.shape[0], -1) for p in muon_split(task.model)[0]]
        factors = []
        for p in task.model.parameters():
            if p.dim() >= 2:
                g = p.detach().reshape(p.shape[0], -1)
                factors += [g @ g.T, g.T @ g]
        ns = timeit(lambda: [newton_schulz(m) for m in mats], device, repeats=20, warmup=3)
        eig = timeit(lambda: [sym_eigh(f) for f in factors], device, repeats=20, warmup=3)
        opt = SPECS["adamw"].make(task.model, 1e-3)
        step = make_stepper(SPECS["adamw"], opt, task)
        it = iter(range(10**9))
        adamw = timeit(lambda: step(next(it)), device, repeats=20, warmup=3)
        out[wname] = {"adamw_ms": round(adamw * 1e3, 3), "ns_ms": round(ns * 1e3, 3),
                      "ns_matrices": len(mats), "eigh_ms_per_refresh": round(eig * 1e3, 3),
                      "eigh_factors": len(factors), "max_factor": max((f.shape[0] for f in factors), default=0),
                      "refresh": refresh}
        log(f"matfun     {wname:13s} AdamW step {adamw * 1e3:.2f} ms | Newton-Schulz {ns * 1e3:.2f} ms/step "
            f"({len(mats)} matrices) | eigh {eig * 1e3:.2f} ms/refresh ({len(factors)} factors)")
    return out


def matfun_markdown(costs: dict) -> str:
    lines = ["| workload | AdamW step | Newton-Schulz per step (× AdamW step) | eigh per refresh | eigh per step, refresh "
             "10 (× AdamW step) |", "|---|---|---|---|---|"]
    for w, c in costs.items():
        a, r = c["adamw_ms"], c["refresh"]
        lines.append(f"| {w} | {a:.2f} ms | {c['ns_ms']:.2f} ms ({c['ns_ms'] / a:.2f}×, {c['ns_matrices']} matrices) | "
                     f"{c['eigh_ms_per_refresh']:.2f} ms ({c['eigh_factors']} factors ≤ {c['max_factor']}) | "
                     f"{c['eigh_ms_per_refresh'] / r:.2f} ms ({c['eigh_ms_per_refresh'] / r / a:.2f}×) |")
    return "\n".join(lines)


def markdown(costs: dict) -> str:
    labels = list(dict.fromkeys(label for per in costs.values() for label in per))
    lines = ["| optimizer | " + " | ".join(costs) + " |", "|---|" + "---|" * len(costs)]
    for label in labels:
        cells = [f"{costs[w][label]['ratio_to_adamw']:.2f}× ({costs[w][label]['ms']:.1f} ms)" if label in costs[w] else "n/a"
                 for w in costs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ablate-sync", action="store_true",
                    help="also time each curvkit variant with its finiteness flag not read back (no host sync)")
    ap.add_argument("--json", default=None, help="also write the costs to this file")
    args = ap.parse_args()
    costs = step_costs(args.workloads, args.optimizers, args.device, args.steps, repeats=args.repeats,
                       data_dir=args.data_dir, ablate_sync=args.ablate_sync)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(costs, f, indent=1)
    print(markdown(costs))


if __name__ == "__main__":
    main()
