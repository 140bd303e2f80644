"""HAWQ mixed-precision bit allocation on the MNIST-5k CNN and the char-LM transformer.

For each workload and seed (a model trained by ``benchmarks/compress_models.py``):
- the per-layer Hessian traces (``compress.sensitivity``) on the calibration batches;
- at the size of uniform b-bit weights (b = 3 and 4; bits to choose from (2, 3, 4, 8)), the
  held-out loss/accuracy of the HAWQ-V3 plan (ILP), the HAWQ-V2 plan (Pareto frontier point),
  uniform b bits, and random allocations of the same or larger size (at most 10% larger; mean and
  best of up to ``--random`` distinct plans);
- the cost of the per-layer sensitivity in operator products next to the report's per-layer
  section (``ck.analyze``) on the same data and seed: the same code path, so the same products.

Usage (repo root): ``PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_bits.py [--quick]
[--seeds 0 1 2] [--device cuda]``. Prints a table and writes ``bits.json`` under ``$OUT`` (or
``benchmarks/results/compress-bits/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import curvkit as ck
from benchmarks.compress_models import trained
from curvkit import compress

BITS = (2, 3, 4, 8)


def random_plans(plan, budget: float, n: int, rng: np.random.Generator) -> list[dict]:
    """Up to ``n`` distinct random allocations with size in [budget, 1.1 * budget]."""
    names = [layer["name"] for layer in plan.layers]
    size = np.array([[layer["choices"][b]["size"] for b in plan.choices] for layer in plan.layers])
    seen, out = set(), []
    for _ in range(200):
        C = rng.integers(0, len(plan.choices), size=(2000, len(names)))
        s = plan.fixed_size + size[np.arange(len(names)), C].sum(1)
        for row in C[(s >= budget * (1 - 1e-9)) & (s <= 1.1 * budget)]:
            key = tuple(row)
            if key not in seen:
                seen.add(key)
                out.append({n: plan.choices[i] for n, i in zip(names, row)})
            if len(out) >= n:
                return out
    return out


def run(name: str, seed: int, device: str, n_random: int, calib_batches: int, compare_report: bool) -> dict:
    t = trained(name, seed, device)
    model, loss_fn = t.model, t.loss_fn
    calib = t.calibration[:calib_batches]
    base = t.evaluate(model)
    t0 = time.perf_counter()
    sens = compress.sensitivity(model, loss_fn, calib, quantities=("trace",), probes=30, seed=seed,
                                params=[n for layer in ck.model.layers(model) if layer.kind in compress.hawq.QUANTIZED_KINDS
                                        for n in layer.param_names])
    sens_s = time.perf_counter() - t0
    rng = np.random.default_rng(1000 + seed)
    rows = []
    for b in (3, 4):
        budget = compress.allocate_bits(model, bits=BITS, size_budget=f"{b}bit", sensitivity=sens).budget["size_budget"]
        res = {"budget_bits": b, "size": budget}
        for method in ("v3", "v2"):
            t1 = time.perf_counter()
            plan = compress.allocate_bits(model, bits=BITS, size_budget=budget, sensitivity=sens, method=method)
            res[f"{method}_seconds"] = time.perf_counter() - t1
            res[method] = {"bits": plan.bits, "size": plan.size, "predicted": plan.predicted_loss_delta,
                           **t.evaluate(plan.apply(model))}
        res["v2_equals_v3"] = res["v2"]["bits"] == res["v3"]["bits"]
        uni = {n: b for n in plan.bits}
        res["uniform"] = {"bits": uni, "size": budget, **t.evaluate(plan.apply(model, bits=uni))}
        rand = [t.evaluate(plan.apply(model, bits=r)) for r in random_plans(plan, budget, n_random, rng)]
        res["random"] = {"count": len(rand),
                         "mean_loss": statistics.fmean(r["loss"] for r in rand) if rand else None,
                         "best_loss": min(r["loss"] for r in rand) if rand else None,
                         "mean_accuracy": statistics.fmean(r["accuracy"] for r in rand) if rand else None,
                         "best_accuracy": max(r["accuracy"] for r in rand) if rand else None}
        res["frontier_points"] = len(plan.frontier)
        rows.append(res)
    out = {"workload": name, "seed": seed, "base": base, "sensitivity_products": sens.matvecs,
           "sensitivity_seconds": sens_s, "layers": [r.row() for r in sens], "rows": rows}
    if compare_report:  # the report's per-layer section on the same data and seed, next to sensitivity's
        one = calib[:1]
        s2 = compress.sensitivity(model, loss_fn, one, probes=30, seed=seed)
        rep = ck.analyze(model, loss_fn, one, k=1, probes=30, density_probes=2, density_iterations=4, seed=seed)
        q = rep.cost["quantities"]
        out["cost_vs_report"] = {
            "sensitivity": s2.cost, "report_layer_traces": q["per-layer traces"],
            "report_layer_top_eigenvalue": q["per-layer top eigenvalue"], "rows_identical": rep.layers == s2.rows()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: one seed, the CNN only, few random plans")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random", type=int, default=30, help="random allocations per budget")
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration batches (of 64) for the traces")
    ap.add_argument("--workloads", nargs="+", default=["mnist_cnn", "char_lm"])
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.random, a.workloads, a.calib_batches = a.seeds[:1], 5, ["mnist_cnn"], 2
    torch.manual_seed(0)
    results = []
    t0 = time.perf_counter()
    for name in a.workloads:
        for seed in a.seeds:
            results.append(run(name, seed, a.device, a.random, a.calib_batches, compare_report=seed == a.seeds[0]))
            print(f"[{name} seed {seed}: {time.perf_counter() - t0:.0f}s]", flush=True)
    print()
    hdr = (f"{'workload':10} {'seed':>4} {'size':>6} {'bytes':>8} | {'V3 loss':>8} {'V2 loss':>8} {'uniform':>8} "
           f"{'rand mean':>9} {'rand best':>9} | {'V3 acc':>7} {'unif acc':>8} {'rand best':>9} | V2=V3")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        for row in r["rows"]:
            rd = row["random"]
            fmt = lambda v: f"{v:9.4f}" if v is not None else f"{'-':>9}"  # noqa: E731
            print(f"{r['workload']:10} {r['seed']:>4} {str(row['budget_bits']) + '-bit':>6} {row['size']:8.0f} | "
                  f"{row['v3']['loss']:8.4f} {row['v2']['loss']:8.4f} {row['uniform']['loss']:8.4f} "
                  f"{fmt(rd['mean_loss'])} {fmt(rd['best_loss'])} | {row['v3']['accuracy']:7.4f} "
                  f"{row['uniform']['accuracy']:8.4f} {fmt(rd['best_accuracy'])} | {row['v2_equals_v3']}")
    print("\nbase (unquantized) held-out loss: " + ", ".join(f"{r['workload']}/{r['seed']}: {r['base']['loss']:.4f}"
                                                       for r in results))
    for name in a.workloads:
        rs = [r for r in results if r["workload"] == name]
        for b in (3, 4):
            rows = [row for r in rs for row in r["rows"] if row["budget_bits"] == b]
            win_u = sum(row["v3"]["loss"] < row["uniform"]["loss"] for row in rows)
            win_r = sum(rd is not None and row["v3"]["loss"] < rd
                        for row in rows for rd in [row["random"]["mean_loss"]])
            win_b = sum(rd is not None and row["v3"]["loss"] < rd
                        for row in rows for rd in [row["random"]["best_loss"]])
            print(f"{name} at uniform-{b}-bit size: HAWQ-V3 below uniform in {win_u}/{len(rows)} seeds, below the "
                  f"random mean in {win_r}/{len(rows)}, below the best random in {win_b}/{len(rows)}")
    for r in results:
        if "cost_vs_report" in r:
            c = r["cost_vs_report"]
            print(f"{r['workload']} seed {r['seed']}: sensitivity products trace {c['sensitivity']['trace']['products']}, "
                  f"top eigenvalue {c['sensitivity']['top_eigenvalue']['products']}; report per-layer section: traces "
                  f"{c['report_layer_traces']['products']}, top eigenvalue {c['report_layer_top_eigenvalue']['products']};"
                  f" rows identical: {c['rows_identical']}")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f}s on {a.device}")
    meta = {"device": a.device, "cuda": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "seconds": total, "bits": BITS, "args": vars(a)}
    d = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results" / "compress-bits"
    d.mkdir(parents=True, exist_ok=True)
    name = "bits-quick.json" if a.quick else "bits.json"
    (d / name).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    print(f"wrote {d / name}")


if __name__ == "__main__":
    main()
