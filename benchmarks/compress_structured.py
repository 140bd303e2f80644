"""Structured pruning: Optimal Brain Apoptosis against magnitude, and torch-pruning (DepGraph) as the peer.

On the trained MNIST-5k CNN (conv channels) and the char-LM transformer (MLP neurons, attention
heads), for 3 seeds and 25/50/75% of the groups removed per layer, with no fine-tune, in one
shot and in ``--steps`` rounds (each round re-scores the groups left on the model the rounds
before shrank, on a geometric schedule of the kept fraction): held-out loss/accuracy, the loss
on the calibration batches (what the pruner saw), the parameter count, and the check that the
smaller model rebuilt from the structure equals the masked model. OBA runs with the Hessian and
with the Gauss-Newton (``--curvatures``). The peer, ``torch-pruning`` run unmodified from its
wheel, prunes the same models at the same per-layer ratio with its MagnitudeImportance,
TaylorImportance and HessianImportance (OBD), each fed the same calibration batches as OBA as
its documentation shows, with ``iterative_steps`` = the same rounds on the same schedule (its
importance re-estimated before every ``step()``); time and (on CUDA) peak memory are per pruning
run.

    PYTHONPATH=$PWD/src:$PWD:/tmp/struct-site python benchmarks/compress_structured.py [--quick]

Writes raw JSON under ``$OUT`` (or ``benchmarks/results/compress-structured/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.compress_models import trained
from curvkit.compress.structured import apply_structure, find_groups, prune_structured, schedule, zero_groups

TASKS = [("mnist_cnn", "channel"), ("char_lm", "neuron"), ("char_lm", "head")]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def peak_start(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return None


@torch.no_grad()
def calibration_loss(t, m: nn.Module) -> float:
    """The loss on the calibration batches (what the pruner saw): the figure a default may be chosen by."""
    was = m.training
    m.eval()
    total = sum(float(t.loss_fn(m(x), y)) * y.numel() for x, y in t.calibration)
    m.train(was)
    return total / sum(y.numel() for _, y in t.calibration)


def curvkit_rows(t, kind, sparsities, device, max_matvecs, steps_list, curvatures):
    """One ``prune_structured`` call per (score, steps, sparsity): with steps > 1 the scores depend on
    the sparsity (each round re-scores the model shrunk so far), so nothing is shared between runs.
    The model measured is the rebuild path: the structure applied to a fresh copy of the original."""
    rows = []
    sets = find_groups(t.model, kind)
    x = t.heldout[0][0]
    configs = [("magnitude", None)] + [("oba", c) for c in curvatures]
    for method, curvature in configs:
        for steps in steps_list:
            for s in sparsities:
                peak_start(device)
                res = prune_structured(t.model, t.loss_fn, t.calibration, sparsity=s, pattern=kind, method=method,
                                       curvature=curvature or "hessian", steps=steps, max_matvecs=max_matvecs,
                                       seed=t.seed)
                mem = peak_mib(device)
                removed = {layer["name"]: layer["removed"] for layer in res.layers}
                masked = zero_groups(t.fresh(), sets, removed)
                small = apply_structure(t.fresh(), res.structure)
                with torch.no_grad():
                    diff = float((small(x) - masked(x)).abs().max())
                    diff_model = float((small(x) - res.model.eval()(x)).abs().max())
                rows.append({"tool": "curvkit", "method": method if method == "magnitude" else f"oba-{curvature}",
                             "steps": steps, "sparsity": s, **t.evaluate(small),
                             "calib_loss": calibration_loss(t, small), "params": n_params(small),
                             "shrunk_vs_masked": max(diff, diff_model), "seconds": res.seconds, "peak_mib": mem,
                             "matvecs": sum(layer.get("matvecs", 0) for layer in res.layers[:1]),
                             "exact": all(layer.get("exact", True) for layer in res.layers),
                             "removed_per_round": {layer["name"]: layer["removed_per_round"]
                                                   for layer in res.layers}})
    return rows


def geometric_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """curvkit's schedule in torch-pruning's form (cumulative ratios, step 0 first), so an
    iterative torch-pruning run removes the same counts per round as curvkit's."""
    return [0.0] + schedule(pruning_ratio, steps)


def tp_rows(t, kind, sparsities, device, steps_list, tp_methods):
    try:
        import torch_pruning as tp
    except ImportError:
        return [{"tool": "torch-pruning", "skipped": "not installed (pip install --no-deps --target /tmp/struct-site "
                 "torch-pruning; put it on PYTHONPATH)"}]
    if kind == "head":
        return [{"tool": "torch-pruning", "skipped": "head pruning of the char-LM's written-out attention (a fused "
                 "qkv viewed as (B, T, 3, heads, hd)) is not compared: torch-pruning's head pruning targets "
                 "nn.MultiheadAttention / separate q,k,v layers"}]
    rows = []
    x_example = t.calibration[0][0][:2]
    weight = sum(len(b[1]) for b in t.calibration)
    for imp_name in tp_methods:
        for steps in steps_list:
            for s in sparsities:
                model = t.fresh()
                names = dict(model.named_modules())
                if kind == "channel":
                    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]  # the classifier's outputs
                else:  # only the MLP hidden units, as curvkit's neuron groups (residual width untouched)
                    ignored = [m for n, m in names.items() if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))
                               and not n.endswith("mlp.0")]
                imp = {"magnitude": tp.importance.MagnitudeImportance(p=2),
                       "taylor": tp.importance.TaylorImportance(),
                       "hessian": tp.importance.HessianImportance()}[imp_name]
                peak_start(device)
                t0 = time.perf_counter()
                pruner = tp.pruner.MetaPruner(model, x_example, importance=imp, pruning_ratio=s, ignored_layers=ignored,
                                              iterative_steps=steps, iterative_pruning_ratio_scheduler=geometric_scheduler)
                for _ in range(steps):  # each round's importance on the model the rounds before pruned
                    if imp_name == "taylor":  # documented use: the loss's gradient, then step
                        model.zero_grad()
                        for xb, yb in t.calibration:
                            (t.loss_fn(model(xb), yb) * len(yb) / weight).backward()
                    elif imp_name == "hessian":  # documented use: per-example gradients accumulated
                        imp.zero_grad()
                        for xb, yb in t.calibration:
                            for i in range(len(yb)):
                                model.zero_grad()
                                t.loss_fn(model(xb[i:i + 1]), yb[i:i + 1]).backward()
                                imp.accumulate_grad(model)
                    pruner.step()
                seconds, mem = time.perf_counter() - t0, peak_mib(device)
                model.zero_grad(set_to_none=True)
                rows.append({"tool": "torch-pruning", "method": imp_name, "steps": steps, "sparsity": s,
                             **t.evaluate(model), "calib_loss": calibration_loss(t, model), "params": n_params(model),
                             "seconds": seconds, "peak_mib": mem})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: one seed, 50%% only, fewer products")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--max-matvecs", type=int, default=None,
                    help="OBA product budget (default: exact, one product per group)")
    ap.add_argument("--calib-batches", type=int, default=None,
                    help="calibration batches of 64 for every method (default: all 8; --quick: 2)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4],
                    help="rounds of pruning to compare (curvkit's steps= and torch-pruning's iterative_steps, both "
                         "on the geometric schedule of the kept fraction)")
    ap.add_argument("--curvatures", nargs="+", default=["hessian", "ggn"], choices=["hessian", "ggn"],
                    help="OBA's curvature (the Hessian, or the PSD Gauss-Newton)")
    ap.add_argument("--tasks", nargs="+", default=[f"{w}:{p}" for w, p in TASKS],
                    choices=[f"{w}:{p}" for w, p in TASKS], help="workload:groups to run")
    ap.add_argument("--tp-methods", nargs="+", default=["magnitude", "taylor", "hessian"],
                    choices=["magnitude", "taylor", "hessian"], help="torch-pruning importances to compare")
    args = ap.parse_args()
    device = torch.device(args.device)
    seeds = args.seeds[:1] if args.quick else args.seeds
    sparsities = [0.5] if args.quick else args.sparsities
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results" / "compress-structured")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for name, kind in [tuple(task.split(":")) for task in args.tasks]:
            t = trained(name, seed, device)
            calib = args.calib_batches or (2 if args.quick else None)
            if calib:
                t.calibration = t.calibration[:calib]
            base = {**t.evaluate(t.model), "calib_loss": calibration_loss(t, t.model), "params": n_params(t.model)}
            budget = 48 if (args.quick and kind == "neuron") else args.max_matvecs
            rows = (curvkit_rows(t, kind, sparsities, device, budget, args.steps, args.curvatures)
                    + tp_rows(t, kind, sparsities, device, args.steps, args.tp_methods))
            for r in rows:
                r.update(workload=name, pattern=kind, seed=seed, dense=base)
                results.append(r)
                if "skipped" not in r:
                    print(f"{name:9s} {kind:7s} seed {seed} {r['tool']:13s} {r['method']:11s} steps {r['steps']} "
                          f"{r['sparsity']:.2f}: loss {r['loss']:.4f} acc {r['accuracy']:.4f} calib loss "
                          f"{r['calib_loss']:.4f} params {r['params']:6d} ({r['seconds']:.2f} s)", flush=True)
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "seeds": seeds,
            "calib_batches": args.calib_batches, "max_matvecs": args.max_matvecs, "steps": args.steps,
            "curvatures": args.curvatures, "tasks": args.tasks, "tp_methods": args.tp_methods}
    (out_dir / ("raw-quick.json" if args.quick else "raw.json")).write_text(json.dumps({"meta": meta, "rows": results},
                                                                                       indent=1))
    table(results)


def table(results):
    import statistics as st

    keyed = {}
    for r in results:
        if "skipped" in r:
            continue
        keyed.setdefault((r["workload"], r["pattern"], r["sparsity"], r["tool"], r["method"], r["steps"]), []).append(r)
    print("\n| workload | groups | removed | tool | score | steps | held-out loss (mean ± sd over seeds) | accuracy | "
          "calibration loss | params | seconds | shrunk = masked |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (w, p, s, tool, m, k), rs in sorted(keyed.items()):
        loss = [r["loss"] for r in rs]
        sd = st.stdev(loss) if len(loss) > 1 else 0.0
        check = f"{max(r['shrunk_vs_masked'] for r in rs):.1e}" if "shrunk_vs_masked" in rs[0] else ""
        print(f"| {w} | {p} | {s:.0%} | {tool} | {m} | {k} | {st.mean(loss):.4f} ± {sd:.4f} | "
              f"{st.mean(r['accuracy'] for r in rs):.4f} | {st.mean(r['calib_loss'] for r in rs):.4f} | "
              f"{rs[0]['params']} | {st.mean(r['seconds'] for r in rs):.2f} | {check} |")
    dense = {(r["workload"], r["seed"]): r["dense"] for r in results}
    for (w, _), d in sorted(dense.items())[:: max(1, len(set(r["seed"] for r in results)))]:
        print(f"dense {w}: loss {d['loss']:.4f} acc {d['accuracy']:.4f} calib loss {d['calib_loss']:.4f} "
              f"params {d['params']}")
    for r in results:
        if "skipped" in r and r["seed"] == results[0]["seed"]:
            print(f"{r['workload']} {r['pattern']}: torch-pruning {r['skipped']}")


if __name__ == "__main__":
    main()
