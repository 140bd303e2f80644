"""OBS/SparseGPT pruning vs magnitude and GPTQ vs round-to-nearest on the trained MNIST-5k CNN and
char-LM transformer (held-out loss and accuracy, 3 seeds), and GPTQ at scale (``--scale``: a
~124M-parameter GPT-2 from a config, random weights, 128 calibration sequences of 512 tokens).

    PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_prune.py              # CPU, 3 seeds
    PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_prune.py --quick      # smoke test
    PYTHONPATH=$PWD/src:$PWD python benchmarks/compress_prune.py --device cuda --scale   # the H200

Calibration data are training-split batches; held-out batches only evaluate. Every layer of
kind linear/conv2d is compressed (the char-LM's head included; its embedding is not). Raw JSON
goes to ``$OUT`` when set, else ``benchmarks/results/compress-prune/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.compress_models import trained
from curvkit import compress
from curvkit.compress.calibration import weight_matrix
from curvkit.compress.prune import select_targets

SPARSITIES = [("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9), ("2:4", None)]


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return None


def run_workload(name: str, seed: int, device: str, quick: bool) -> list[dict]:
    t = trained(name, seed, device)
    rows = [{"workload": name, "seed": seed, "kind": "dense", "config": "-", "method": "dense", **t.evaluate(t.model)}]
    calib = t.calibration[:2] if quick else t.calibration
    sp = SPARSITIES[:1] + SPARSITIES[-1:] if quick else SPARSITIES
    targets = select_targets(t.model, None)
    for pattern, sparsity in sp:
        # n:m: the layers whose width holds it (the CNN's first conv, 25 inputs, stays dense)
        params = None if pattern == "unstructured" else [n for l in targets if weight_matrix(l).shape[1] % 4 == 0
                                                         for n in l.param_names if n.endswith("weight")]
        for method in ("magnitude", "obs"):
            _peak_reset(device)
            t0 = time.perf_counter()
            res = compress.prune(t.model, t.loss_fn, calib, sparsity=sparsity, method=method, pattern=pattern,
                                 params=params)
            sec = time.perf_counter() - t0
            cfg = pattern if pattern != "unstructured" else f"{sparsity:.0%}"
            rows.append({"workload": name, "seed": seed, "kind": "prune", "config": cfg, "method": method,
                         "sparsity": res.sparsity, "seconds": sec, "peak_mib": _peak(device), **t.evaluate(res.model),
                         "max_condition": max((i.get("condition") or 0) for i in res.layers),
                         "dampings": sorted({i.get("damping") for i in res.layers if i.get("damping") is not None})})
    widest = max(weight_matrix(l).shape[1] for l in targets)
    configs = [(b, None) for b in (3, 4)] + ([(b, 128) for b in (3, 4)] if widest > 128 else [])
    for bits, group in configs[:2] if quick else configs:
        for method in ("rtn", "gptq"):
            _peak_reset(device)
            t0 = time.perf_counter()
            res = compress.quantize(t.model, calib if method == "gptq" else None, bits=bits, method=method,
                                    group_size=group)
            sec = time.perf_counter() - t0
            rows.append({"workload": name, "seed": seed, "kind": "quant",
                         "config": f"{bits}b" + (f" g{group}" if group else " per-ch"), "method": method,
                         "size_bytes": res.size, "seconds": sec, "peak_mib": _peak(device), **t.evaluate(res.model),
                         "max_condition": max((i.get("condition") or 0) for i in res.layers),
                         "dampings": sorted({i["damping"] for i in res.layers if i["damping"] is not None})})
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Mean (and spread) over seeds, one line per (workload, kind, config, method)."""
    keys, groups = [], {}
    for r in rows:
        k = (r["workload"], r["kind"], r["config"], r["method"])
        if k not in groups:
            keys.append(k)
        groups.setdefault(k, []).append(r)
    out = ["| workload | compression | method | held-out loss | accuracy | seconds | seeds |",
           "|---|---|---|---|---|---|---|"]
    for k in keys:
        g = groups[k]
        loss = [r["loss"] for r in g]
        acc = [r["accuracy"] for r in g]
        sd = f" ± {statistics.stdev(loss):.3f}" if len(g) > 1 else ""
        sec = statistics.mean(r.get("seconds", 0.0) for r in g)
        out.append(f"| {k[0]} | {k[1]} {k[2]} | {k[3]} | {statistics.mean(loss):.3f}{sd} | "
                   f"{statistics.mean(acc):.3f} | {sec:.2f} | {len(g)} |")
    # the head-to-head: how often the curvature method wins at equal compression, seed by seed
    out.append("")
    for (w, kind, cfg, m), g in groups.items():
        base = {"obs": "magnitude", "gptq": "rtn"}.get(m)
        if base is None:
            continue
        other = {r["seed"]: r["loss"] for r in groups[(w, kind, cfg, base)]}
        wins = sum(r["loss"] < other[r["seed"]] for r in g)
        out.append(f"{w} {kind} {cfg}: {m} beats {base} on held-out loss in {wins}/{len(g)} seeds")
    return out


def run_scale(device: str, quick: bool) -> dict:
    """GPTQ (4 bits, per channel) of a GPT-2 built from a config (random weights): the time of the
    whole quantize() call, the peak device memory and the damping each layer needed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        cfg, n, length, max_batch = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128), 8, 64, 4
    else:
        cfg, n, length, max_batch = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024), 128, 512, 16
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (n, length), generator=gen).to(device)
    calib = list(ids.split(max_batch))
    out = {"params": params, "layers": None, "sequences": n, "tokens": length, "device": device}
    for method in ("rtn", "gptq"):
        _peak_reset(device)
        t0 = time.perf_counter()
        res = compress.quantize(model, calib if method == "gptq" else None, bits=4, method=method, inplace=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[method] = {"seconds": time.perf_counter() - t0, "peak_mib": _peak(device), "size_bytes": res.size,
                       "original_bytes": res.original_size}
        if method == "gptq":
            out["layers"] = len(res.layers)
            out["dampings"] = {str(d): sum(i["damping"] == d for i in res.layers) for d in
                               sorted({i["damping"] for i in res.layers})}
            out["max_condition"] = max(i["condition"] for i in res.layers)
            out["sweep_seconds"] = sum(i["seconds"] for i in res.layers)
        del res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: one seed, the CNN, few configurations")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workloads", nargs="+", default=["mnist_cnn", "char_lm"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", action="store_true", help="also GPTQ of a 124M GPT-2 (a tiny one under --quick)")
    ap.add_argument("--scale-only", action="store_true", help="only the --scale measurement")
    args = ap.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    workloads = args.workloads[:1] if args.quick else args.workloads
    outdir = Path(os.environ.get("OUT") or Path(__file__).parent / "results" / "compress-prune")
    outdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": args.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "quick": args.quick}
    if torch.device(args.device).type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if not args.scale_only:
        rows = []
        for w in workloads:
            for s in seeds:
                rows += run_workload(w, s, args.device, args.quick)
                print(f"done {w} seed {s}", flush=True)
        result["rows"] = rows
        lines = summarize(rows)
        print("\n".join(lines))
        result["table"] = lines
    if args.scale or args.scale_only:
        sc = run_scale(args.device, args.quick)
        result["scale"] = sc
        print(f"\nGPTQ at scale: GPT-2 {sc['params'] / 1e6:.1f}M params, {sc['layers']} layers, {sc['sequences']} x "
              f"{sc['tokens']} tokens on {sc['device']}: quantize() {sc['gptq']['seconds']:.1f} s "
              f"(sweeps {sc['sweep_seconds']:.1f} s), peak {sc['gptq']['peak_mib']} MiB; RTN "
              f"{sc['rtn']['seconds']:.2f} s; damping used {sc['dampings']}, max condition {sc['max_condition']:.3g}")
    name = "quick.json" if args.quick else ("scale.json" if args.scale_only else "results.json")
    (outdir / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {outdir / name}")


if __name__ == "__main__":
    main()
