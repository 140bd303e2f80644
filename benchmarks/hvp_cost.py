"""Cost of curvature products as a ratio to one gradient over the same data, side by side with
curvlinops (its code untouched), on ResNet-20 (width 16, eval mode), CIFAR-shaped inputs.

    python benchmarks/hvp_cost.py --device cuda               # the figures in BENCHMARKS.md
    python benchmarks/hvp_cost.py --device cpu --quick        # smoke run on a laptop

Every figure is seconds(product) / seconds(gradient), both measured in this run, the median of
``--repeats`` timed runs after warm-up (on CUDA, curvkit's default replays a CUDA graph captured
during warm-up; its "(eager)" rows run without). "curvkit Hessian" is ``method="auto"``: on CUDA it
measures both product methods on the first batch (its choice is printed), on the CPU it takes double
backward. Products of curvkit and curvlinops on the same random vectors are compared too (relative
difference), to show they compute the same matrix.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import curvkit as ck  # noqa: E402
from _timing import timeit  # noqa: E402
from models import cifar_like, resnet20  # noqa: E402


def gradient_fn(model, loss_fn, data):
    n = sum(len(y) for _, y in data)

    def run():
        model.zero_grad(set_to_none=True)
        for x, y in data:
            (loss_fn(model(x), y) * (len(y) / n)).backward()

    return run


def curvlinops_ops(model, loss_fn, data):
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError as e:  # the peer is optional: pip install 'curvkit[bench]'
        print(f"curvlinops not importable ({e}); its rows are skipped", file=sys.stderr)
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(check_deterministic=False)
    return {
        "curvlinops Hessian": HessianLinearOperator(model, loss_fn, params, data, **kw),
        "curvlinops GGN": GGNLinearOperator(model, loss_fn, params, data, **kw),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--probes", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run on CPU")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.batches, args.repeats = [16], 2, 1
    device = torch.device(args.device)
    loss_fn = torch.nn.CrossEntropyLoss()
    model = resnet20(device)
    n = sum(p.numel() for p in model.parameters())
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "params": n, "rows": {}}
    print(f"# ResNet-20, {n:,} parameters, {args.batches} batches, device {results['device']}, torch {torch.__version__}")
    for bs in args.batch_sizes:
        data = cifar_like(args.batches, bs, device)
        t_grad = timeit(gradient_fn(model, loss_fn, data), device, args.repeats)
        ops = {
            "curvkit Hessian": ck.hessian(model, loss_fn, data),
            "curvkit Hessian (eager)": ck.hessian(model, loss_fn, data, method="forward-over-reverse", cuda_graphs=False),
            "curvkit Hessian (forward-over-reverse)": ck.hessian(model, loss_fn, data, method="forward-over-reverse"),
            "curvkit Hessian (double backward)": ck.hessian(model, loss_fn, data, method="double-backward", cuda_graphs=False),
            "curvkit GGN": ck.ggn(model, loss_fn, data),
            "curvkit GGN (eager)": ck.ggn(model, loss_fn, data, cuda_graphs=False),
            **curvlinops_ops(model, loss_fn, data),
        }
        gen = torch.Generator().manual_seed(0)
        for k in args.probes:
            if k > 1:  # the double-backward loop is k separate products; it showed its cost at k=1
                ops.pop("curvkit Hessian (double backward)", None)
            V = torch.randn(n, k, generator=gen).to(device)
            products = {}
            for name, op in ops.items():
                t = timeit(lambda: op @ V, device, args.repeats)
                products[name] = op @ V
                if getattr(op, "choice", None):
                    print(f"batch {bs:5d}  probes {k:3d}  {name}: method='auto' chose {op.choice}")
                if getattr(op, "_graphs", None) is not None:
                    op._graphs.graphs.clear()  # free the captured graph's memory before the next row
                row = results["rows"].setdefault(f"{name} | {k}", {})
                row[bs] = round(t / t_grad, 2)
                print(f"batch {bs:5d}  probes {k:3d}  {name:38s} {t * 1e3:9.1f} ms  = {t / t_grad:5.2f} x gradient", flush=True)
            for a, b in [("curvkit Hessian", "curvlinops Hessian"), ("curvkit GGN", "curvlinops GGN"),
                         ("curvkit Hessian", "curvkit Hessian (double backward)")]:
                if a in products and b in products:
                    rel = float((products[a] - products[b]).norm() / products[b].norm())
                    print(f"batch {bs:5d}  probes {k:3d}  |{a} - {b}| / |{b}| = {rel:.1e}")
        del ops, products
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        results.setdefault("gradient_ms", {})[bs] = round(t_grad * 1e3, 2)
        print(f"batch {bs:5d}  gradient {t_grad * 1e3:.1f} ms")
    print("\n| product | probes | " + " | ".join(f"batch {bs}" for bs in args.batch_sizes) + " |")
    print("|---|---|" + "---|" * len(args.batch_sizes))
    for key, row in results["rows"].items():
        name, k = key.split(" | ")
        print(f"| {name} | {k} | " + " | ".join(f"{row.get(bs, float('nan')):.2f}" for bs in args.batch_sizes) + " |")
    out = args.json or (os.path.join(os.environ["OUT"], "hvp_cost.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
