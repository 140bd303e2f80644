"""Curvature and optimizers over torch.distributed (issue 18): the data sharded over N processes at
the same total data, against one process.

    # one H200, then two (NCCL; NVLink multicast stays off: the script sets NCCL_NVLS_ENABLE=0)
    NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD/src:$PWD python -m torch.distributed.run --standalone --nproc-per-node 1 \\
        benchmarks/distributed.py --model gpt85m resnet20
    NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD/src:$PWD python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/distributed.py --model gpt85m resnet20 --reference distributed_cuda_w1.json --inline-reference
    # CPU smoke run (gloo, tiny models, seconds): 1 then 2 processes, the second checked against the first
    PYTHONPATH=$PWD/src:$PWD python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/distributed.py --quick
    PYTHONPATH=$PWD/src:$PWD python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/distributed.py \\
        --quick --reference benchmarks/results/distributed/distributed_cpu_w1.json

**Part 1, curvature** (``--parts curvature``). Models: the byte-level GPT of the scale issue
(``benchmarks/scale_lm.py``: ``gpt85m``, ``gpt300m``, trained ``--train-steps`` AdamW steps, eval
mode, math attention) and ResNet-20 (``benchmarks/models.py``, eval mode, CIFAR-shaped random
data). The data is ``--total-batch`` examples in batches of ``--batch`` (both fixed across world
sizes); batch ``j`` goes to rank ``j % world``, so each rank holds ``total / world`` examples and
every batch has the same shape at every world size (its own product is the same kernels, the same
bits). Per world size: one Hessian product and one GGN product with a fixed-seed probe ``v``
(operator built and warmed up first: the figure is the product), the top-5 eigenvalues
(``ck.eigenvalues(H, k=5, tol=--tol, seed=0)``) and a Hutch++ trace (``--trace-probes``, seed 0).
Each row: seconds (the slowest rank), peak memory per GPU (``torch.cuda.max_memory_allocated``
after a reset, the largest over ranks), products. Every rank builds the model from the same seed
(deterministic kernels while it trains, so that two launches build the same weights) and takes
rank 0's weights by broadcast; the weights' bit checksum is saved, so a comparison between runs
says when the weights differ instead of blaming the sharding.

**The check against one process.** ``--reference PATH`` (the JSON of an earlier run, normally 1
process) and ``--inline-reference`` (rank 0 alone recomputes everything on ALL the data with
``distributed=False`` while the other ranks wait; side by side in one run, so the speed-up is of
one launch) compare: the products' norms ``||Hv||``, a checksum ``<w, Hv>`` with a second
fixed-seed vector ``w``, the eigenvalues and the trace. Tolerance ``--rtol`` (default 1e-4),
relative to a scale that has no cancellation: ``||Hv||`` for the norm, ``||w|| ||Hv||`` for the
checksum (Cauchy-Schwarz), ``|lambda_1| ~ ||H||`` for every eigenvalue (Weyl: a perturbation
``E`` moves each eigenvalue by at most ``||E||``), ``|tr|`` for the trace. Why 1e-4: the sharded
sum adds the same per-batch float32 terms in another order (rank sums, then the all-reduce), which
moves a sum of ``B`` terms by at most ``(B-1) u`` (``u = 6e-8``) times the sum of their absolute
values: about 2e-7-2e-6 relative for the 4-32 batches here; Lanczos and Hutch++ carry that
through 20-60 products and a QR. 1e-4 is ~1000 u, yet 100x below what a sharding bug gives (a
batch missing or counted twice moves the mean by ~1/B >= 3e-2). The measured differences are
printed next to it.

**Part 2, optimizers under DDP** (``--parts optim``): ``torch.nn.parallel.DistributedDataParallel``
around the same models in train mode, ``--opt-total-batch`` examples per step split over the ranks
(each rank its slice of the same global batch). AdamW (torch) against curvkit's KFAC (its factor
statistics all-reduced by the optimizer), Shampoo, SOAP and Muon, built as the optimizer benchmark
builds them (``benchmarks/optim/optimizers.py``, refresh every 10). Per optimizer: seconds per step
(mean over ``--steps`` steps after ``--warmup``, which includes the refreshes, and the median),
the ratio to AdamW's mean, peak memory; then every rank's parameters and buffers are reduced to
an exact integer checksum of their bits and all-gathered: "bit-identical" or not (when not, the
largest difference from rank 0's parameters).

Rank 0 prints the tables and writes ``distributed_<cpu|cuda>_w<world>.json`` under ``$OUT`` when
set, else ``--out`` (default ``benchmarks/results/distributed/``). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

# NVLink multicast (NVLS) stays off on the shared machines, whatever the caller's environment says;
# NCCL reads it when the first communicator is created, after this line.
if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
    print(f"# NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']} overridden to 0 (NVLink multicast stays off)",
          file=sys.stderr)
os.environ["NCCL_NVLS_ENABLE"] = "0"
# deterministic cuBLAS while the models are built (read when cuBLAS starts, so set before torch uses CUDA)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import curvkit as ck  # noqa: E402
from models import ResNet20, cifar_like  # noqa: E402
from scale_lm import GIB, build as build_gpt, lm_loss, text_batches  # noqa: E402

from benchmarks.optim.optimizers import SPECS  # noqa: E402

MODELS = ("gpt85m", "gpt300m", "resnet20")
OPTIMIZERS = ("adamw", "kfac", "shampoo", "soap", "muon")
# learning rates inside each optimizer's grid in benchmarks/optim (the steps are timed, not trained to a
# target; the rates only keep the parameters finite and moving)
LR = {"adamw": 1e-3, "kfac": 1e-3, "shampoo": 1e-3, "soap": 3e-3, "muon": 2e-2}
# (total examples, batch) of the curvature part and the examples per optimizer step, per model
DEFAULTS = {"gpt": dict(total=32, batch=8, opt_total=16), "resnet20": dict(total=1024, batch=128, opt_total=256)}
QUICK = {"gpt": dict(total=4, batch=1, opt_total=4), "resnet20": dict(total=8, batch=2, opt_total=8)}
GOAL = 1.8  # issue 18: speed-up of products and eigenvalues on 2 GPUs at equal total data


# -- the process group ------------------------------------------------------------------------
def setup(device_kind: str) -> tuple[int, int, torch.device]:
    """Initialise the default group from torchrun's variables (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:  # plain `python benchmarks/distributed.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=15))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=15))
    return dist.get_rank(), dist.get_world_size(), device


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn, device, group: bool = True):
    """(result, seconds of the slowest rank, peak GiB of the fullest GPU or None on CPU).
    ``group=False``: this rank alone (the inline reference), no collective."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if group:
        dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    pk = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    if group:
        dt = reduce_max(dt, device)
        pk = reduce_max(pk, device) if pk is not None else None
    return out, dt, pk


# -- exact checksums --------------------------------------------------------------------------
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_checksum(tensors, device) -> int:
    """An integer of the tensors' bits (each element's bit pattern times a position weight, summed in
    int64 with wrap-around: integer sums do not depend on their order, so this is exact and the same
    on any device). Equal tensors give equal checksums; a one-bit change changes it."""
    parts = []
    for j, t in enumerate(tensors):
        b = t.detach().contiguous().reshape(-1)
        ints = b.view(_INT[b.element_size()]).to(torch.int64)
        w = torch.arange(ints.numel(), device=b.device, dtype=torch.int64) % 65521 + 1 + j
        parts.append((ints * w).sum().to(device))
    s = torch.stack(parts) if parts else torch.zeros(1, dtype=torch.int64, device=device)
    mix = torch.arange(1, s.numel() + 1, device=device, dtype=torch.int64) * 1_000_003
    return int((s * mix).sum())


def model_tensors(model: nn.Module) -> list:
    return [p for p in model.parameters()] + [b for b in model.buffers()]


# -- models and data --------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic():
    """Deterministic kernels and one CPU thread (a CPU matmul's sums depend on the thread count),
    so that two launches with different world sizes build the same weights; restored after."""
    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        torch.set_num_threads(threads)


def resnet(device, quick: bool, seed: int = 0) -> nn.Module:
    """ResNet-20 (width 16; 4 with ``quick``) in eval mode, BatchNorm statistics from a few
    train-mode passes, as ``benchmarks.models.resnet20`` builds it."""
    torch.manual_seed(seed)
    model = ResNet20(width=4 if quick else 16).to(device)
    with torch.no_grad():
        model.train()
        for x, _ in images(3, 32 if quick else 128, device, quick, seed + 1):
            model(x)
    return model.eval()


def images(batches: int, batch: int, device, quick: bool, seed: int):
    if not quick:
        return cifar_like(batches, batch, device, seed)
    g = torch.Generator().manual_seed(seed)  # 3x8x8 inputs: a CPU smoke run
    return [(torch.randn(batch, 3, 8, 8, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(batches)]


def family(name: str) -> str:
    return "gpt" if name.startswith("gpt") else name


def make_model(name: str, device, args) -> nn.Module:
    with deterministic():
        if family(name) == "gpt":
            size = "tiny" if args.quick else name[3:]
            model = build_gpt(size, "math", device, args.train_steps, 4 if args.quick else 8, args.context)
        else:
            model = resnet(device, args.quick)
    for t in model_tensors(model):  # every rank analyses rank 0's weights
        dist.broadcast(t.data, src=0)
    return model


def curvature_data(name: str, device, args, total: int, batch: int):
    n = total // batch
    if family(name) == "gpt":
        return text_batches(n, batch, args.context, device, seed=1)[0]
    return images(n, batch, device, args.quick, seed=5)


def loss_of(name: str):
    return lm_loss if family(name) == "gpt" else nn.CrossEntropyLoss()


# -- part 1: curvature ------------------------------------------------------------------------
def curvature(model, loss_fn, data, device, args, distributed: bool) -> dict:
    """Every curvature figure of one model on ``data`` (this rank's shard when ``distributed``)."""
    group = distributed
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    w = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    out = {}

    def product_row(op):
        y, dt, pk = timed(lambda: op @ v, device, group)
        norm = float(y.norm())
        return {"seconds": dt, "peak_gib": pk, "products": 1, "norm": norm,
                "checksum": float(w @ y), "checksum_scale": float(w.norm()) * norm}

    H = ck.hessian(model, loss_fn, data, method=args.method, distributed=distributed)
    H @ v  # the method's choice, CUDA-graph capture: not part of the product's figure
    out["hvp"] = {**product_row(H), "strategy": H.strategy}
    G = ck.ggn(model, loss_fn, data, distributed=distributed)
    G @ v
    out["ggn"] = product_row(G)
    del G
    r, dt, pk = timed(lambda: ck.eigenvalues(H, k=args.k, tol=args.tol, max_matvecs=args.max_matvecs, seed=0), device, group)
    out["top5"] = {"seconds": dt, "peak_gib": pk, "products": r.matvecs, "values": [float(x) for x in r.values],
                   "converged": bool(r.converged)}
    del r
    t, dt, pk = timed(lambda: ck.trace(H, method="hutch++", probes=args.trace_probes, seed=0), device, group)
    out["trace"] = {"seconds": dt, "peak_gib": pk, "products": t.matvecs, "value": float(t.value),
                    "stderr": float(t.stderr), "method": t.method}
    out["examples_per_rank"] = sum(len(y) for _, y in data)
    return out


def compare(res: dict, ref: dict, rtol: float) -> dict:
    """Relative differences from the reference on cancellation-free scales (module docstring)."""
    def rel(a, b, scale):
        return abs(a - b) / max(abs(scale), 1e-300)

    d = {
        "hvp_norm": rel(res["hvp"]["norm"], ref["hvp"]["norm"], ref["hvp"]["norm"]),
        "hvp_checksum": rel(res["hvp"]["checksum"], ref["hvp"]["checksum"], ref["hvp"]["checksum_scale"]),
        "ggn_norm": rel(res["ggn"]["norm"], ref["ggn"]["norm"], ref["ggn"]["norm"]),
        "ggn_checksum": rel(res["ggn"]["checksum"], ref["ggn"]["checksum"], ref["ggn"]["checksum_scale"]),
        "eigenvalues": max(rel(a, b, ref["top5"]["values"][0]) for a, b in zip(res["top5"]["values"], ref["top5"]["values"])),
        "trace": rel(res["trace"]["value"], ref["trace"]["value"], ref["trace"]["value"]),
    }
    worst = max(d.values())
    return {"differences": d, "worst": worst, "rtol": rtol, "equal": worst <= rtol,
            "trace_diff_over_stderr": abs(res["trace"]["value"] - ref["trace"]["value"]) / max(ref["trace"]["stderr"], 1e-300),
            "speedup": {k: ref[k]["seconds"] / res[k]["seconds"] for k in ("hvp", "ggn", "top5", "trace")
                        if res[k]["seconds"] > 0}}


# -- part 2: optimizers under DDP ---------------------------------------------------------------
def optimizers(name: str, built: nn.Module, device, args, rank: int, world: int, log) -> dict:
    loss_fn = loss_of(name)
    total = args.sizes[family(name)]["opt_total"]
    if total % world:
        raise SystemExit(f"--opt-total-batch {total} is not divisible by the world size {world}")
    local = total // world
    if family(name) == "gpt":
        _, draw = text_batches(0, total, args.context, device, seed=2)
    else:
        g = torch.Generator().manual_seed(3)
        hw = 8 if args.quick else 32

        def draw():
            return (torch.randn(total, 3, hw, hw, generator=g).to(device), torch.randint(0, 10, (total,), generator=g).to(device))
    steps = args.warmup + args.steps
    batches = [draw() for _ in range(steps)]  # the same global batches for every optimizer
    batches = [(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]) for x, y in batches]
    rows = {}
    for opt_name in args.optimizers:
        model = copy.deepcopy(built).train()  # the same weights for every optimizer (rank 0's)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        spec = SPECS[opt_name]
        opt = spec.make(model, LR[opt_name])  # KFAC and Muon hook / split the module itself, not the wrapper
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        error = None
        try:
            for i, (x, y) in enumerate(batches):
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(ddp(x), y)
                loss.backward()
                opt.step()
                sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - one optimizer failing is a result to report
            error = f"{type(e).__name__}: {str(e)[:200]}"
        failed = reduce_max(1.0 if error else 0.0, device)
        if failed:
            rows[opt_name] = {"error": error or "failed on another rank"}
            log(f"{name:9s} {opt_name:8s} FAILED {rows[opt_name]['error']}")
        else:
            pk = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
            mean = reduce_max(statistics.fmean(times), device)
            med = reduce_max(statistics.median(times), device)
            # parameters (what the optimizer writes) and buffers apart: DDP broadcasts rank 0's buffers at
            # the start of each forward, and BatchNorm then updates them from the rank's own batch
            mine = torch.tensor([bit_checksum(list(model.parameters()), device),
                                 bit_checksum(list(model.buffers()), device)], dtype=torch.int64, device=device)
            every = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            sums = [int(t[0]) for t in every]
            identical = len(set(sums)) == 1
            buffers_identical = len({int(t[1]) for t in every}) == 1
            row = {"seconds_mean": mean, "seconds_median": med, "steps": args.steps,
                   "peak_gib": reduce_max(pk, device) if pk is not None else None,
                   "loss": float(loss.detach()), "bit_identical": identical, "checksums": sums,
                   "buffers_identical": buffers_identical,
                   "lr": LR[opt_name], "refresh": spec.default_refresh}
            if not identical:
                row["max_abs_diff_from_rank0"] = max_diff_from_rank0(model, device)
            rows[opt_name] = row
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del ddp, opt, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows.get("adamw", {}).get("seconds_mean")
    for r in rows.values():
        if base and "seconds_mean" in r:
            r["x_adamw"] = r["seconds_mean"] / base
    return rows


def max_diff_from_rank0(model, device) -> float:
    worst = 0.0
    for t in model.parameters():
        r0 = t.detach().clone()
        dist.broadcast(r0, src=0)
        if t.is_floating_point():
            worst = max(worst, float((t.detach() - r0).abs().max()) if t.numel() else 0.0)
        elif not torch.equal(t, r0):
            worst = float("inf")
    return reduce_max(worst, device)


# -- report -----------------------------------------------------------------------------------
def fmt_pk(pk):
    return f"{pk:6.1f}" if pk is not None else "     -"


def curvature_table(name: str, res: dict, cmp: dict | None, inline: dict | None, log) -> None:
    log(f"{'task':6s} {'seconds':>9s} {'peak GiB':>8s} {'products':>8s}  result"
        + ("   speed-up vs 1 process (reference / inline)" if (cmp or inline) else ""))
    for task in ("hvp", "ggn", "top5", "trace"):
        r = res[task]
        if task in ("hvp", "ggn"):
            what = f"||A v|| {r['norm']:.6g}" + (f" ({r['strategy']})" if "strategy" in r else "")
        elif task == "top5":
            what = " ".join(f"{x:.5g}" for x in r["values"]) + ("" if r["converged"] else " (not converged)")
        else:
            what = f"{r['value']:.6g} +- {r['stderr']:.3g} ({r['method']})"
        sp = []
        for c in (cmp, inline):
            if c is not None and task in c["speedup"]:
                sp.append(f"{c['speedup'][task]:.2f}x")
        log(f"{task:6s} {r['seconds']:9.3f} {fmt_pk(r['peak_gib']):>8s} {r['products']:8d}  {what}"
            + (f"   {' / '.join(sp)}" if sp else ""))
    for label, c in (("reference file", cmp), ("inline 1-process", inline)):
        if c is None:
            continue
        d = c["differences"]
        verdict = "EQUAL within" if c["equal"] else "DIFFERENT beyond"
        note = "" if c.get("weights_match", True) else "  [weights differ from the reference run: not comparable]"
        log(f"  vs {label}: {verdict} rtol {c['rtol']:g} (worst {c['worst']:.2e}: "
            + ", ".join(f"{k} {x:.1e}" for k, x in d.items())
            + f"; trace diff / stderr {c['trace_diff_over_stderr']:.1e}){note}")


def optim_table(name: str, rows: dict, log) -> None:
    log(f"{'optimizer':9s} {'s/step':>9s} {'median':>9s} {'x AdamW':>8s} {'peak GiB':>8s}  parameters across ranks")
    for opt, r in rows.items():
        if "error" in r:
            log(f"{opt:9s} FAILED {r['error']}")
            continue
        same = "bit-identical" if r["bit_identical"] else f"DIFFER (max |diff| {r['max_abs_diff_from_rank0']:.2e})"
        if not r["buffers_identical"]:
            same += "; buffers differ (BatchNorm statistics of each rank's own batch)"
        log(f"{opt:9s} {r['seconds_mean']:9.4f} {r['seconds_median']:9.4f} {r.get('x_adamw', float('nan')):8.2f} "
            f"{fmt_pk(r['peak_gib']):>8s}  {same}")


def parse_sizes(args) -> dict:
    base = QUICK if args.quick else DEFAULTS
    sizes = {k: dict(v) for k, v in base.items()}
    for flag, key in (("total_batch", "total"), ("batch", "batch"), ("opt_total_batch", "opt_total")):
        for item in getattr(args, flag) or []:
            fam, _, val = item.rpartition("=")
            for f in ([family(fam)] if fam else list(sizes)):
                sizes[f][key] = int(val)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["gpt85m", "resnet20"], choices=MODELS)
    ap.add_argument("--parts", nargs="+", default=["curvature", "optim"], choices=["curvature", "optim"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--total-batch", nargs="*", help="examples of the curvature data, fixed across world sizes: "
                    "N (every model) or gpt=N / resnet20=N (default gpt=32, resnet20=1024)")
    ap.add_argument("--batch", nargs="*", help="examples per batch (same forms; default gpt=8, resnet20=128)")
    ap.add_argument("--opt-total-batch", nargs="*", help="examples per optimizer step over all ranks "
                    "(default gpt=16, resnet20=256)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=30, help="AdamW steps that train the GPT before analysis")
    ap.add_argument("--method", default="auto", choices=["auto", "double-backward", "forward-over-reverse"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-matvecs", type=int, default=None, help="product budget of the top-k (default: the library's)")
    ap.add_argument("--trace-probes", type=int, default=20, help="Hutch++ products (>= 20, else it is Hutchinson)")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reference", default=None, help="JSON of an earlier run (normally 1 process) to check against")
    ap.add_argument("--inline-reference", action="store_true",
                    help="rank 0 also computes the curvature on all the data alone (distributed=False)")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--quick", action="store_true", help="tiny models on CPU: a smoke run of seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed"))
    args = ap.parse_args()
    if args.quick:
        args.context, args.train_steps, args.trace_probes, args.steps, args.warmup = 16, 5, 20, 2, 1
        args.k, args.max_matvecs = 3, args.max_matvecs or 12
        args.model = [m for m in args.model if m != "gpt300m"] or ["gpt85m"]
    args.sizes = parse_sizes(args)
    rank, world, device = setup(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)) if device.type == "cpu" else torch.get_num_threads())
    lines = []

    def log(s=""):
        if rank == 0:
            print(s, flush=True)
            lines.append(s)

    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    info = {"device": name_dev, "backend": dist.get_backend(), "world": world, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "sizes": args.sizes,
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "models": {}}
    ref = json.loads(Path(args.reference).read_text()) if args.reference else None
    log(f"# distributed benchmark: {world} x {name_dev}, {info['backend']}, torch {torch.__version__}"
        + (" (quick)" if args.quick else ""))
    for name in args.model:
        entry = info["models"].setdefault(name, {})
        model = make_model(name, device, args)
        n = sum(p.numel() for p in model.parameters())
        entry["parameters"] = n
        entry["weights_checksum"] = bit_checksum(model_tensors(model), device)
        if "curvature" in args.parts:
            s = args.sizes[family(name)]
            if s["total"] % s["batch"] or (s["total"] // s["batch"]) % world:
                raise SystemExit(f"{name}: total {s['total']} must be a multiple of batch {s['batch']} times the "
                                 f"world size {world}, so every rank holds the same number of whole batches")
            data = curvature_data(name, device, args, s["total"], s["batch"])
            log(f"\n## {name}: {n:,} parameters; curvature over {s['total']} examples in batches of {s['batch']}, "
                f"{s['total'] // world} per rank")
            res = curvature(model, loss_of(name), data[rank::world], device, args, distributed=True)
            entry["curvature"] = res
            cmp = inline = None
            if ref is not None and name in ref.get("models", {}) and "curvature" in ref["models"][name]:
                r = ref["models"][name]
                cmp = compare(res, r["curvature"], args.rtol)
                cmp["weights_match"] = r.get("weights_checksum") == entry["weights_checksum"]
                cmp["reference_world"] = ref.get("world")
                entry["vs_reference"] = cmp
            if args.inline_reference:
                if rank == 0:  # the others wait at the barrier below (no collective inside)
                    one = curvature(model, loss_of(name), data, device, args, distributed=False)
                    inline = compare(res, one, args.rtol)
                    entry["inline_reference"] = {"curvature": one, "comparison": inline}
                dist.barrier()
            curvature_table(name, res, cmp, inline, log)
            del data
        if "optim" in args.parts:
            t = args.sizes[family(name)]["opt_total"]
            log(f"\n## {name}: optimizers under DDP, {t} examples per step ({t // world} per rank), "
                f"{args.steps} timed steps after {args.warmup}")
            entry["optim"] = optimizers(name, model, device, args, rank, world, log)
            optim_table(name, entry["optim"], log)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"distributed_{device.type}_w{world}.json"
        path.write_text(json.dumps(info, indent=1, default=str))
        (out / f"distributed_{device.type}_w{world}.txt").write_text("\n".join(lines) + "\n")
        print(f"# wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
