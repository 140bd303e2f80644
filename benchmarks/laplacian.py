"""Laplacians of an MLP over its inputs: time and peak memory of ck.laplacian's forward Laplacian
against nested autograd, torch.func (jacfwd of jacrev, vmapped) and torch-jet (jet-for-pytorch,
unmodified, where it imports: it needs Python >= 3.12), side by side in one run; then the
randomized estimators' (Hutchinson, STDE) error against their number of directions, at high d.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/laplacian.py            # the GPU figures (batch 2048, width 256)
    PYTHONPATH=$PWD/src:$PWD python benchmarks/laplacian.py --quick    # a CPU smoke test at reduced sizes

Two tasks per method: ``value`` (the Laplacian only, no graph kept where the method allows) and
``train`` (a PINN step: the loss ``mean(lap^2)`` and its backward to the weights). Peak memory is
``torch.cuda.max_memory_allocated`` above what the model and inputs hold (on CUDA), or the peak
RSS growth of a fresh subprocess per measurement (on CPU). Prints tables; writes raw JSON under
``$OUT`` if set, else ``benchmarks/results/laplace/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import curvkit as ck

try:
    from benchmarks._timing import sync, timeit
except ImportError:  # run as a script from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._timing import sync, timeit

METHODS = ("curvkit", "nested_autograd", "torch_func", "torch_jet")


def mlp(d: int, width: int, device, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).to(device=device, dtype=dtype)


def nested_autograd(net, x, create_graph):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    lap = 0
    for i in range(x.shape[1]):
        (gi,) = torch.autograd.grad(g[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        lap = lap + gi[:, i]
    return lap


def torch_func(net, x):
    f = lambda p: net(p[None])[0, 0]  # noqa: E731
    return torch.vmap(lambda p: torch.func.jacfwd(torch.func.jacrev(f))(p).trace())(x)


def torch_jet(net, x):
    import jet  # jet-for-pytorch, unmodified

    lap = jet.laplacian(net, (x[0],))  # nn.Linear takes one (d,) example: no indexing, which jet has no rule for
    return torch.vmap(lap)(x)[:, 0]


def laplacian_of(method: str, net, x, train: bool):
    if method == "curvkit":
        return ck.laplacian(net, x, create_graph=train).value
    if method == "nested_autograd":
        return nested_autograd(net, x, create_graph=train)
    if method == "torch_func":
        return torch_func(net, x)
    return torch_jet(net, x)


def cell(method: str, d: int, batch: int, width: int, device: str, task: str, repeats: int) -> dict:
    """One measurement: seconds (median) and peak memory of one task."""
    dev = torch.device(device)
    net = mlp(d, width, dev)
    x = torch.rand(batch, d, generator=torch.Generator().manual_seed(1)).to(dev)
    train = task == "train"

    def run():
        if train:
            net.zero_grad(set_to_none=True)
            laplacian_of(method, net, x, True).pow(2).mean().backward()
        else:
            with torch.no_grad() if method == "curvkit" else torch.enable_grad():
                laplacian_of(method, net, x, False)

    try:
        ref = ck.laplacian(net, x[:8], create_graph=False).value
        got = laplacian_of(method, net, x[:8], False).detach()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run()
            sync(dev)
            first = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base
            seconds = timeit(run, dev, repeats=repeats if first < 2 else 1, warmup=1 if first < 2 else 0)
        else:
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            run()
            first = time.perf_counter() - t0
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
            seconds = timeit(run, dev, repeats=repeats, warmup=0) if first < 20 else first
        return dict(method=method, d=d, task=task, seconds=seconds, peak_bytes=int(peak), rel_err=err)
    except Exception as e:  # noqa: BLE001 (a peer that cannot run this size is reported, not fatal)
        return dict(method=method, d=d, task=task, error=f"{type(e).__name__}: {str(e)[:160]}")


def run_cell(args, method, d, task) -> dict:
    if args.device.startswith("cuda"):
        return cell(method, d, args.batch, args.width, args.device, task, args.repeats)
    # CPU: a fresh process per measurement, so its peak RSS is its own
    cmd = [sys.executable, __file__, "--cell", method, str(d), task, "--batch", str(args.batch), "--width",
           str(args.width), "--device", args.device, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict(method=method, d=d, task=task, error=(out.stderr.strip().splitlines() or ["?"])[-1][:160])


def estimators(d_list, batch, width, device, probes_list) -> list[dict]:
    """Randomized Laplacians' error against directions, at high d (reference: the chunked exact one)."""
    rows = []
    dev = torch.device(device)
    for d in d_list:
        net = mlp(d, width, dev)
        x = torch.rand(batch, d, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            t0 = time.perf_counter()
            exact = ck.laplacian(net, x, create_graph=False, chunk=min(d, 1024)).value
            sync(dev)
            t_exact = time.perf_counter() - t0
            for method in ("hutchinson", "stde"):
                for K in probes_list:
                    if method == "stde" and K > d:
                        continue
                    fn = lambda: ck.laplacian(net, x, method=method, probes=K, seed=0, create_graph=False)  # noqa: E731
                    r = fn()
                    sec = timeit(fn, dev, repeats=3, warmup=1)
                    rms = exact.pow(2).mean().sqrt()
                    rel = float((r.value - exact).pow(2).mean().sqrt() / rms)
                    cover = float(((r.value - exact).abs() < 4 * r.stderr).float().mean())
                    rows.append(dict(d=d, method=method, probes=K, rel_rms_err=rel,
                                     rel_rms_stderr=float(r.stderr.pow(2).mean().sqrt() / rms),
                                     within_4_stderr=cover, seconds=sec, exact_seconds=t_exact))
    return rows


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke test at reduced sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dims", type=int, nargs="*", default=None)
    p.add_argument("--cell", nargs=3, default=None, metavar=("METHOD", "D", "TASK"))
    args = p.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (256 if quick else 2048)
    args.width = args.width or (128 if quick else 256)
    args.repeats = args.repeats or (2 if quick else 5)
    if args.cell:
        m, d, task = args.cell
        print(json.dumps(cell(m, int(d), args.batch, args.width, args.device, task, args.repeats)))
        return
    dims = args.dims or ([2, 10, 50] if quick else [2, 10, 50, 100, 1000])
    skip = {"torch_func": 100 if quick else 1000, "nested_autograd": 10**9}  # largest d each runs
    rows = []
    for d in dims:
        for task in ("value", "train"):
            for m in METHODS:
                if d > skip.get(m, 10**9) or (m in ("torch_func", "torch_jet") and task == "train" and d > 100):
                    continue
                r = run_cell(args, m, d, task)
                rows.append(r)
                print(json.dumps(r), flush=True)
    est = estimators([100, 1000] if quick else [1000, 10000, 100000], 32 if quick else 256, args.width,
                     args.device, [4, 16, 64] if quick else [4, 16, 64, 256])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n## Exact Laplacian, MLP {args.width}x3 tanh, batch {args.batch}, {device_name}, torch {torch.__version__}")
    print("| d | task | method | seconds | peak memory | vs nested: time | vs nested: memory | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['d']} | {r['task']} | {r['method']} | {r['error']} | | | | |")
            continue
        ref = next((q for q in rows if q["d"] == r["d"] and q["task"] == r["task"]
                    and q["method"] == "nested_autograd" and "error" not in q), None)
        tr = f"{ref['seconds'] / r['seconds']:.2f}x faster" if ref else "-"
        mr = f"{r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x" if ref else "-"
        print(f"| {r['d']} | {r['task']} | {r['method']} | {r['seconds']:.4f} | {fmt_bytes(r['peak_bytes'])} | "
              f"{tr} | {mr} | {r['rel_err']:.1e} |")
    print("\n## Randomized Laplacians: relative RMS error against directions (reference: exact, chunked)")
    print("| d | method | directions | RMS error / RMS lap | RMS stderr / RMS lap | within 4 stderr | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in est:
        print(f"| {r['d']} | {r['method']} | {r['probes']} | {r['rel_rms_err']:.3g} | {r['rel_rms_stderr']:.3g} | "
              f"{r['within_4_stderr']:.2f} | {r['seconds']:.4f} |")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results" / "laplace"
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick-" if quick else ""
    (out / f"laplacian-{tag}{args.device.split(':')[0]}.json").write_text(json.dumps(
        dict(device=device_name, torch=torch.__version__, batch=args.batch, width=args.width, exact=rows,
             estimators=est, command=" ".join(sys.argv)), indent=1))


if __name__ == "__main__":
    main()
