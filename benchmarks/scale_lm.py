"""curvkit against PyHessian 0.1, curvlinops 3 and hessian-eigenthings 1.0.0a5 (their code untouched)
on byte-level GPT-2-shaped decoders of 85M, 300M and 700M parameters, all in one run.

    python benchmarks/scale_lm.py --device cuda                       # the figures in BENCHMARKS.md
    python benchmarks/scale_lm.py --device cpu --quick                # smoke run (a tiny decoder)

Setup (as the scale issue measured it): vocabulary 256 (bytes of the Python stdlib's source), context
512, 4 batches of 8 sequences, fp32, the model trained ``--train-steps`` AdamW steps first (so the
curvature is a trained network's, not an initialisation's). Attention is ``"math"`` (written out:
every library can differentiate it twice) unless ``--attention sdpa`` (PyTorch's default
``scaled_dot_product_attention`` kernels, which only curvkit runs through, by re-running the model
on the math backend).

Per size, each row: seconds (building the operator included), products (columns; a block of b
counts b), peak GPU memory (``max_memory_allocated``, absolute: the same model and data for all),
the result and its error bar. Tasks: one gradient; H @ v and G @ v (as a ratio to the gradient);
top-1 at tol 1e-3; top-5; the trace (Hutchinson, ``--trace-probes``). For top-1 the error is
``|lambda - ref| / ref`` against curvkit's top-1 at tol 1e-6 in the same run, and curvkit's
reported residual is checked against a direct product. ``--bf16`` adds curvkit's top-1 on a bf16
copy of the model (fp32 reductions), compared with the fp32 value. Nothing is downloaded; results
go to stdout and ``$OUT/scale_lm.json`` when ``OUT`` is set (``--json`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import curvkit as ck  # noqa: E402
from _timing import sync  # noqa: E402
from vs_pyhessian import Counter, count_pyhessian, counting_scipy, free, run_timed  # noqa: E402

SIZES = {  # (width, layers, heads): 85.6M, 303M, 709M parameters at vocabulary 256, context 512
    "85m": (768, 12, 12), "300m": (1024, 24, 16), "700m": (1280, 36, 20), "tiny": (32, 2, 2),
}
GIB = 2**30


# -- the model -------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int, attention: str):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            a = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, attention: str = "math", vocab: int = 256, context: int = 512):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, attention) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def lm_loss(out, y):
    """The loss as users write it: a plain function over the flattened tokens."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def text_batches(n_batches: int, batch: int, context: int, device, seed: int = 0):
    from benchmarks.optim.workloads import stdlib_text

    codes = torch.tensor(list(stdlib_text(2_000_000).encode("ascii", errors="replace")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)

    def draw():
        start = torch.randint(0, len(codes) - context - 1, (batch,), generator=g)
        x = torch.stack([codes[s : s + context] for s in start])
        y = torch.stack([codes[s + 1 : s + context + 1] for s in start])
        return x.to(device), y.to(device)

    return [draw() for _ in range(n_batches)], draw


def build(size: str, attention: str, device, train_steps: int, batch: int, context: int, seed: int = 0):
    torch.manual_seed(seed)
    d, layers, heads = SIZES[size]
    model = GPT(d, layers, heads, "math", context=context).to(device)
    _, draw = text_batches(0, batch, context, device, seed + 7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(train_steps):
        x, y = draw()
        opt.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()
        opt.step()
    del opt
    model.eval()
    for b in model.blocks:
        b.attention = attention
    for p in model.parameters():
        p.grad = None
    return model


# -- measuring ---------------------------------------------------------------------------------
def peak_reset(device):
    free(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # reserved memory then starts from what is allocated
        torch.cuda.reset_peak_memory_stats()


def chosen(H) -> dict:
    """The product method ``method="auto"`` took for ``H``, and why (None for a forced method)."""
    c = H.choice or {}
    return {"chosen": c.get("chosen"), "why": c.get("why", "")[:60]}


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def measure(rows, size, task, method, fn, device, products=None, extra=None):
    peak_reset(device)
    try:
        out, dt, msgs = run_timed(fn, device)
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report
        rows.append({"size": size, "task": task, "method": method, "error": f"{type(e).__name__}: {str(e)[:160]}"})
        print(f"{size:5s} {task:8s} {method:48s} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        free(device)
        return None
    row = {"size": size, "task": task, "method": method, "seconds": round(dt, 3), "peak_gib": peak(device),
           "warnings": msgs}
    if device.type == "cuda":  # a CUDA graph's replay allocates nothing: its pool shows in reserved memory only
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    if products is not None:
        row["products"] = products() if callable(products) else products
    if extra is not None:
        row.update(extra(out))
    rows.append(row)
    pk = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
    print(f"{size:5s} {task:8s} {method:48s} {dt:8.2f} s  {pk:10s} "
          f"{ {k: v for k, v in row.items() if k not in ('size', 'task', 'method', 'seconds', 'peak_gib', 'warnings')} }",
          flush=True)
    free(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=["85m", "300m", "700m"], choices=list(SIZES))
    ap.add_argument("--tasks", nargs="+", default=["grad", "hvp", "ggn", "top1", "top5", "trace"])
    ap.add_argument("--peers", nargs="*", default=["pyhessian", "curvlinops", "eigenthings"])
    ap.add_argument("--peer-tasks", nargs="*", default=None,
                    help="size:task pairs the peers run (default: every task at every size)")
    ap.add_argument("--attention", choices=["math", "sdpa"], default="math")
    ap.add_argument("--compare-sdpa", action="store_true", help="also time curvkit's H@v on default SDPA kernels")
    ap.add_argument("--bf16", action="store_true", help="also curvkit's top-1 on a bf16 copy of the model")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--trace-probes", type=int, default=20)
    ap.add_argument("--trace-methods", nargs="+", default=["auto"], help="curvkit product methods for the trace rows")
    ap.add_argument("--eigenthings-iters", type=int, default=6, help="its Lanczos steps, chosen by hand")
    ap.add_argument("--ref-tol", type=float, default=1e-6,
                    help="tolerance of curvkit's reference top-1 (the err column); 0 skips it (700M: 15 products)")
    ap.add_argument("--top5-block", action="store_true", help="also curvkit's top-5 with block size 5")
    ap.add_argument("--lean", action="store_true",
                    help="also curvkit's top-1/top-5 with retain_graphs=False (no gradient graphs kept between products)")
    ap.add_argument("--hf", action="store_true",
                    help="also a transformers GPT2LMHeadModel from a config (random weights, default SDPA attention)")
    ap.add_argument("--quick", action="store_true", help="a tiny decoder on short sequences, for a CPU smoke run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.context, args.batch, args.batches, args.train_steps = ["tiny"], 32, 2, 2, 5
        args.trace_probes = 4
    device = torch.device(args.device)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "args": vars(args), "rows": []}
    rows = info["rows"]
    print(f"# scale_lm on {info['device']}, torch {torch.__version__}", flush=True)
    peer_ok = (lambda s, t: True) if args.peer_tasks is None else (lambda s, t: f"{s}:{t}" in args.peer_tasks)
    for size in args.sizes:
        model = build(size, args.attention, device, args.train_steps, args.batch, args.context)
        n = sum(p.numel() for p in model.parameters())
        data, _ = text_batches(args.batches, args.batch, args.context, device, seed=1)
        print(f"## {size}: {n:,} parameters, {args.batches} x {args.batch} x {args.context} tokens", flush=True)
        tasks = args.tasks

        def gradient():
            model.zero_grad(set_to_none=True)
            for x, y in data:
                (lm_loss(model(x), y) / len(data)).backward()
            model.zero_grad(set_to_none=True)

        t_grad = None
        if "grad" in tasks:
            gradient()  # warm-up
            measure(rows, size, "grad", "torch (one gradient)", gradient, device)
            t_grad = rows[-1]["seconds"]
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(n, generator=gen).to(device)
        if "hvp" in tasks:
            H = ck.hessian(model, lm_loss, data)
            H @ v  # the method choice and warm-up
            measure(rows, size, "hvp", f"curvkit H@v ({H.strategy})", lambda: H @ v, device, 1,
                    lambda _: {"choice": {k: (v_ if isinstance(v_, str) else {a: round(b / (GIB if a == "peak_bytes" else 1), 3)
                                                                                for a, b in v_.items()})
                                          for k, v_ in (H.choice or {}).items()}})
            with H.retaining():  # the products of an algorithm: each batch's gradient graph kept from the first
                H @ v
                measure(rows, size, "hvp", f"curvkit H@v again, gradient graphs kept ({H.strategy})", lambda: H @ v,
                        device, 1, lambda _: {"graphs_kept": len(H._kept.graphs) if H._kept else 0,
                                              "kept_gib": round(H._kept.held / GIB, 2) if H._kept else 0})
            del H
            if args.compare_sdpa:
                for b in model.blocks:
                    b.attention = "sdpa"
                Hs = ck.hessian(model, lm_loss, data)
                Hs @ v
                measure(rows, size, "hvp", "curvkit H@v, default SDPA kernels (math fallback)", lambda: Hs @ v, device, 1)
                del Hs
                for b in model.blocks:
                    b.attention = args.attention
            if "pyhessian" in args.peers and peer_ok(size, "hvp"):
                _pyhessian_hvp(rows, size, model, data, v, device)
        for row in rows:  # products as a ratio to the gradient of the same run
            if row.get("size") == size and row.get("task") in ("hvp", "ggn") and t_grad and "seconds" in row:
                row["x_gradient"] = round(row["seconds"] / t_grad, 2)
        if "ggn" in tasks:
            G = ck.ggn(model, lm_loss, data)
            G @ v
            measure(rows, size, "ggn", "curvkit G@v", lambda: G @ v, device, 1)
            if t_grad and "seconds" in rows[-1]:
                rows[-1]["x_gradient"] = round(rows[-1]["seconds"] / t_grad, 2)
            del G
        ref = None
        if "top1" in tasks:
            H = ck.hessian(model, lm_loss, data)
            if args.ref_tol > 0:
                ref = measure(rows, size, "top1", f"curvkit reference (tol {args.ref_tol:g})",
                              lambda: ck.eigenvalues(H, k=1, tol=args.ref_tol), device, None,
                              lambda r: {"products": r.matvecs, "value": float(r.values[0])})
            ref_val = float(ref.values[0]) if ref is not None else None

            def err(val):
                return None if ref_val is None else abs(val - ref_val) / abs(ref_val)

            ops = {}

            def top1():
                ops["H"] = ck.hessian(model, lm_loss, data)
                return ck.eigenvalues(ops["H"], k=1, tol=1e-3)

            r = measure(rows, size, "top1", "curvkit eigenvalues k=1 tol 1e-3", top1, device, None,
                        lambda r: {"products": r.matvecs, "value": float(r.values[0]), "err": err(float(r.values[0])),
                                   "residual": float(r.residuals[0]), "converged": r.converged,
                                   **chosen(ops["H"]),
                                   "seconds_kept": (ops["H"].choice or {}).get("double-backward", {}).get("seconds_kept")})
            ops.clear()
            if r is not None:  # the reported residual against a direct product
                Hv = H @ r.vectors[:, 0]
                rows[-1]["direct_residual"] = float((Hv - r.values[0] * r.vectors[:, 0]).norm())
                del Hv, r
            del H
            # PyHessian stops on a relative change of the eigenvalue below 1e-3, which its value meets
            # long before a residual does: tol 1e-2 on the residual gives it the same eigenvalue accuracy
            measure(rows, size, "top1", "curvkit eigenvalues k=1 tol 1e-2 (PyHessian's accuracy)",
                    lambda: ck.eigenvalues(ck.hessian(model, lm_loss, data), k=1, tol=1e-2), device, None,
                    lambda r: {"products": r.matvecs, "value": float(r.values[0]), "err": err(float(r.values[0])),
                               "residual": float(r.residuals[0]), "converged": r.converged})
            if args.lean:  # memory first: no kept graphs, double backward, then half-batch passes too
                for method, mb in (("auto", None), ("double-backward", None), ("double-backward", max(1, args.batch // 2))):
                    def lean(method=method, mb=mb):
                        ops["H"] = ck.hessian(model, lm_loss, data, retain_graphs=False, method=method, max_batch=mb)
                        return ck.eigenvalues(ops["H"], k=1, tol=1e-3)

                    measure(rows, size, "top1", "curvkit eigenvalues k=1 tol 1e-3, retain_graphs=False"
                            + (f", {method}" if method != "auto" else "") + (f", max_batch={mb}" if mb else ""),
                            lean, device, None,
                            lambda r: {"products": r.matvecs, "value": float(r.values[0]),
                                       "err": err(float(r.values[0])), "converged": r.converged,
                                       **chosen(ops["H"])})
                    ops.clear()
            if args.bf16:
                mb = copy.deepcopy(model).to(torch.bfloat16)
                measure(rows, size, "top1", "curvkit eigenvalues k=1 tol 1e-2, bf16 model",
                        lambda: ck.eigenvalues(ck.hessian(mb, lm_loss, data), k=1, tol=1e-2), device, None,
                        lambda r: {"products": r.matvecs, "value": float(r.values[0]), "err": err(float(r.values[0])),
                                   "residual": float(r.residuals[0]), "converged": r.converged})
                del mb
            _peers_top(rows, size, 1, model, data, device, args, peer_ok, err)
        if "top5" in tasks:
            measure(rows, size, "top5", "curvkit eigenvalues k=5 tol 1e-3",
                    lambda: ck.eigenvalues(ck.hessian(model, lm_loss, data), k=5, tol=1e-3), device, None,
                    lambda r: {"products": r.matvecs, "values": [round(float(x), 4) for x in r.values],
                               "converged": r.converged})
            if args.lean:
                measure(rows, size, "top5", "curvkit eigenvalues k=5 tol 1e-3, retain_graphs=False",
                        lambda: ck.eigenvalues(ck.hessian(model, lm_loss, data, retain_graphs=False), k=5, tol=1e-3),
                        device, None, lambda r: {"products": r.matvecs, "values": [round(float(x), 4) for x in r.values],
                                                 "converged": r.converged})
            if args.top5_block:
                measure(rows, size, "top5", "curvkit eigenvalues k=5 tol 1e-3, block 5",
                        lambda: ck.eigenvalues(ck.hessian(model, lm_loss, data), k=5, tol=1e-3, block_size=5),
                        device, None, lambda r: {"products": r.matvecs, "values": [round(float(x), 4) for x in r.values],
                                                 "converged": r.converged})
            _peers_top(rows, size, 5, model, data, device, args, peer_ok, None)
        if "trace" in tasks:
            for how in args.trace_methods:
                measure(rows, size, "trace", f"curvkit Hutchinson, {args.trace_probes} probes, method {how}",
                        lambda: ck.trace(ck.hessian(model, lm_loss, data, method=how), method="hutchinson",
                                         probes=args.trace_probes),
                        device, args.trace_probes, lambda r: {"value": r.value, "stderr": r.stderr})
            if "pyhessian" in args.peers and peer_ok(size, "trace"):
                _pyhessian_trace(rows, size, model, data, device)
        del model, data
        free(device)
    if args.hf:
        try:
            _hf_rows(rows, device, args)
        except Exception as e:  # noqa: BLE001 - keep the rows measured so far
            import traceback

            traceback.print_exc()
            rows.append({"size": "hf-gpt2", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    out = args.json or (os.path.join(os.environ["OUT"], "scale_lm.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(info, indent=1, default=str))


# -- peers -------------------------------------------------------------------------------------
def _pyhessian(model, data, device):
    from pyhessian import hessian

    return hessian(model, lm_loss, dataloader=data, cuda=device.type == "cuda")


def _pyhessian_hvp(rows, size, model, data, v, device):
    try:
        from pyhessian.utils import normalization  # noqa: F401
    except ImportError as e:
        print(f"pyhessian not importable ({e})")
        return
    hc = _pyhessian(model, data, device)
    vs = [t.clone() for t in _split(v, model)]
    hc.dataloader_hv_product(vs)  # warm-up
    measure(rows, size, "hvp", "PyHessian H@v", lambda: hc.dataloader_hv_product(vs), device, 1)


def _pyhessian_trace(rows, size, model, data, device):
    try:
        hc = _pyhessian(model, data, device)
    except ImportError as e:
        print(f"pyhessian not importable ({e})")
        return
    c = Counter()
    count_pyhessian(hc, c)
    measure(rows, size, "trace", "PyHessian trace (own stopping rule)", lambda: hc.trace(maxIter=100, tol=1e-3), device,
            lambda: c.columns, lambda t: {"value": sum(t) / len(t),
                                          "stderr": float(torch.tensor(t).std() / math.sqrt(len(t))) if len(t) > 1 else None})


def _split(v, model):
    out, i = [], 0
    for p in model.parameters():
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _peers_top(rows, size, k, model, data, device, args, peer_ok, err):
    task = f"top{k}"
    if "pyhessian" in args.peers and peer_ok(size, task):
        try:
            hc = _pyhessian(model, data, device)
            c = Counter()
            count_pyhessian(hc, c)
            measure(rows, size, task, "PyHessian power iteration (tol 1e-3)",
                    lambda: hc.eigenvalues(maxIter=100, tol=1e-3, top_n=k), device, lambda: c.columns,
                    lambda r: {"values": [round(float(x), 4) for x in r[0]],
                               **({"err": err(float(r[0][0]))} if err else {})})
            del hc
        except ImportError as e:
            print(f"pyhessian not importable ({e})")
    if "curvlinops" in args.peers and peer_ok(size, task):
        try:
            from curvlinops import HessianLinearOperator
            from scipy.sparse.linalg import eigsh
        except ImportError as e:
            print(f"curvlinops not importable ({e})")
        else:
            def run():
                op = HessianLinearOperator(_ClassesFirst(model), nn.CrossEntropyLoss(), list(model.parameters()),
                                           data, check_deterministic=False, progressbar=False).to_scipy()
                cnt = Counter()
                w, _ = eigsh(counting_scipy(op, cnt), k=k, which="LA", tol=1e-3)
                return w, cnt.columns

            measure(rows, size, task, "curvlinops + scipy eigsh (tol 1e-3)", run, device, None,
                    lambda r: {"products": r[1], "values": sorted((round(float(x), 4) for x in r[0]), reverse=True),
                               **({"err": err(float(max(r[0])))} if err else {})})
    if "eigenthings" in args.peers and peer_ok(size, task):
        try:
            import hessian_eigenthings as he
        except ImportError as e:
            print(f"hessian-eigenthings not importable ({e})")
            return
        for iters in (None, max(args.eigenthings_iters, 2 * k)):
            def run(iters=iters):
                op = he.HessianOperator(model, data, he.supervised_loss(lm_loss))
                return he.lanczos(op, k=k, max_iter=iters, tol=1e-3, which="LA", seed=0)

            name = f"hessian-eigenthings Lanczos, max_iter={'default' if iters is None else iters}"
            measure(rows, size, task, name, run, device, None,
                    lambda r: {"products": int(r.iterations), "values": [round(float(x), 4) for x in r.eigenvalues],
                               "converged": [bool(c) for c in r.converged],
                               **({"err": err(float(r.eigenvalues[0]))} if err else {})})


def _hf_rows(rows, device, args) -> None:
    """A transformers GPT-2 as it comes: ``ModelOutput`` (curvkit picks ``output="logits"``) and its
    default SDPA attention (curvkit re-runs it on the math backend; PyHessian cannot differentiate it)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        print(f"transformers not importable ({e})")
        return
    size = "hf-gpt2"
    cfg = dict(vocab_size=256, n_positions=args.context, n_embd=768 if not args.quick else 32,
               n_layer=12 if not args.quick else 2, n_head=12 if not args.quick else 2)
    torch.manual_seed(0)
    models = {impl: GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation=impl)).to(device).eval()
              for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    n = sum(p.numel() for p in models["sdpa"].parameters())
    data, _ = text_batches(args.batches, args.batch, args.context, device, seed=1)
    print(f"## {size}: GPT2LMHeadModel, {n:,} parameters, default attention {models['sdpa'].config._attn_implementation}",
          flush=True)
    m = models["sdpa"]

    def gradient():
        m.zero_grad(set_to_none=True)
        for x, y in data:
            (lm_loss(m(x).logits, y) / len(data)).backward()
        m.zero_grad(set_to_none=True)

    gradient()
    measure(rows, size, "grad", "torch (one gradient, SDPA)", gradient, device)
    t_grad = rows[-1].get("seconds")
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    for impl, model in models.items():
        H = ck.hessian(model, lm_loss, data, output="logits")
        H @ v
        measure(rows, size, "hvp", f"curvkit H@v, attention {impl} ({H.strategy})", lambda: H @ v, device, 1)
        if t_grad and "seconds" in rows[-1]:
            rows[-1]["x_gradient"] = round(rows[-1]["seconds"] / t_grad, 2)
        del H
        if "pyhessian" in args.peers:
            try:
                hc = _pyhessian(_Logits(model), data, device)
                vs = [t.clone() for t in _split(v, model)]
                measure(rows, size, "hvp", f"PyHessian H@v, attention {impl}", lambda: hc.dataloader_hv_product(vs),
                        device, 1)
                del hc
            except ImportError as e:
                print(f"pyhessian not importable ({e})")
    measure(rows, size, "top1", "curvkit eigenvalues k=1 tol 1e-3, SDPA model",
            lambda: ck.eigenvalues(ck.hessian(m, lm_loss, data, output="logits"), k=1, tol=1e-3), device, None,
            lambda r: {"products": r.matvecs, "value": float(r.values[0]), "residual": float(r.residuals[0]),
                       "converged": r.converged})


class _Logits(nn.Module):
    """A transformers model returning its logits tensor, for peers that need a tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


class _ClassesFirst(nn.Module):
    """The decoder with logits as (B, V, T), the layout nn.CrossEntropyLoss takes (for curvlinops)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).transpose(1, 2)


if __name__ == "__main__":
    main()
