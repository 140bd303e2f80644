"""Influence functions: mislabel detection on digits (and MNIST-5k) by self-influence, and
kronfluence's EK-FAC side by side (unmodified, from its wheel, where it imports).

    PYTHONPATH=$PWD/src:$PWD python benchmarks/influence.py            # digits + MNIST-5k, 3 seeds
    PYTHONPATH=$PWD/src:$PWD python benchmarks/influence.py --quick    # digits only, 1 seed (CPU smoke test)
    PYTHONPATH=$PWD/src:$PWD python benchmarks/influence.py --device cuda   # the GPU run

Footprint: fit and score time and peak memory of curvkit and kronfluence, each in a fresh
process (CUDA: max_memory_allocated; CPU: polled resident set), with and without low-rank
query gradients (``query_rank`` / kronfluence's ``query_gradient_low_rank``, ``--ranks``).

Mislabels: flip 10% of the training labels to another class, train the MLP (Adam, checkpoints every
epoch for TracIn), rank the training set by self-influence (EK-FAC, Identity, TracIn) and by the
loss; report the fraction of flipped examples among the top 10% and 20%. kronfluence: EK-FAC with
the empirical Fisher on both sides (deterministic), the same model, data and damping; Spearman
correlation of the (query x train) scores and of self-influence, fit and score time. Prints
tables; writes raw JSON under ``$OUT`` if set, else ``benchmarks/results/influence/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curvkit import datasets, influence

DAMPING = 1e-3


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(np.asarray(a).ravel(), np.asarray(b).ravel()).statistic)


def make_task(name: str, seed: int, device):
    x, y = datasets.digits() if name == "digits" else datasets.mnist5k()
    (xtr, ytr), (xte, yte) = datasets.split(x, y, test_fraction=0.2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = len(ytr)
    flip = torch.randperm(n, generator=g)[: n // 10]
    noisy = ytr.clone()
    noisy[flip] = (ytr[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flip] = True
    return xtr.to(device), noisy.to(device), xte.to(device), yte.to(device), is_flipped


def mlp(d_in: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn(side: int, seed: int) -> nn.Module:
    """Two 3x3 convolutions (8 and 16 channels, the second strided) and a linear head."""
    torch.manual_seed(seed)
    s = (side - 2 - 3) // 2 + 1
    return nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * s * s, 10))


def train(model, x, y, epochs: int, seed: int, lr: float = 3e-3, bs: int = 64):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    ckpts = []
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(bs):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
    return ckpts[:: max(1, len(ckpts) // 5)], lr


def found(scores: torch.Tensor, flipped: torch.Tensor, frac: float) -> float:
    k = int(round(frac * len(scores)))
    top = scores.argsort(descending=True)[:k]
    return float(flipped[top.cpu()].sum() / flipped.sum())


def mislabel(name: str, seed: int, device, epochs: int, arch: str = "mlp") -> dict:
    x, y, xte, yte, flipped = make_task(name, seed, device)
    x, xte = x.reshape(len(y), -1), xte.reshape(len(yte), -1)
    d = x[0].numel()
    model = (mlp(d, seed) if arch == "mlp" else cnn(int(round(d ** 0.5)), seed)).to(device)
    ckpts, lr = train(model, x, y, epochs, seed)
    model.eval()
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    lossf = nn.CrossEntropyLoss()
    out, rank = {}, {}
    t = time.perf_counter()
    rank["ekfac"] = influence.EKFAC(model, lossf, data, damping=DAMPING).fit().self_influence()
    out["ekfac_s"] = time.perf_counter() - t
    rank["identity"] = influence.Identity(model, lossf, data).fit().self_influence()
    rank["tracin"] = influence.TracIn(model, lossf, data, ckpts, lr=lr).fit().self_influence()
    with torch.no_grad():
        rank["loss"] = nn.functional.cross_entropy(model(x), y, reduction="none")
        out["test_acc"] = float((model(xte).argmax(1) == yte).float().mean())
    for m, s in rank.items():
        out[m] = {"at10": found(s, flipped, 0.1), "at20": found(s, flipped, 0.2)}
    return out


def vs_kronfluence(device, quick: bool) -> dict | None:
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as e:
        print(f"kronfluence not importable ({e}); skipped")
        return None
    import logging
    logging.disable(logging.WARNING)
    x, y, xte, yte, _ = make_task("digits", 0, device)
    model = mlp(64, 0).to(device)
    train(model, x, y, 10 if quick else 30, 0)
    model.eval()
    nq = 50
    xq, yq = xte[:nq], yte[:nq]

    class CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            return nn.functional.cross_entropy(model(xb), yb, reduction="sum")

        def compute_measurement(self, batch, model):
            xb, yb = batch
            return nn.functional.cross_entropy(model(xb), yb, reduction="sum")

    res = {}
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    t = time.perf_counter()
    ours = influence.EKFAC(model, nn.CrossEntropyLoss(), data, damping=DAMPING, kind="empirical").fit()
    res["curvkit_fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    S_ours = ours.scores((xq, yq))
    res["curvkit_score_s"] = time.perf_counter() - t
    self_ours = ours.self_influence()

    kmodel = prepare_model(model, CE())
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("digits", kmodel, CE(), cpu=device.type == "cpu", disable_tqdm=True, output_dir=tmp)
        ds = torch.utils.data.TensorDataset(x, y)
        fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        t = time.perf_counter()
        an.fit_all_factors("f", ds, per_device_batch_size=256, factor_args=fa)
        res["kronfluence_fit_s"] = time.perf_counter() - t
        sa = ScoreArguments(damping_factor=DAMPING)
        t = time.perf_counter()
        an.compute_pairwise_scores("s", "f", torch.utils.data.TensorDataset(xq, yq), ds,
                                   per_device_query_batch_size=nq, per_device_train_batch_size=256, score_args=sa)
        res["kronfluence_score_s"] = time.perf_counter() - t
        S_kf = an.load_pairwise_scores("s")["all_modules"]
        an.compute_self_scores("ss", "f", ds, per_device_train_batch_size=256, score_args=sa)
        self_kf = an.load_self_scores("ss")["all_modules"]
    res["spearman_pairwise"] = spearman(S_ours.cpu(), S_kf.cpu())
    res["spearman_self"] = spearman(self_ours.cpu(), self_kf.cpu())
    res["pearson_pairwise"] = float(np.corrcoef(S_ours.cpu().numpy().ravel(), S_kf.cpu().numpy().ravel())[0, 1])
    res["queries"], res["train"] = nq, len(y)
    return res


class Peak:
    """Peak memory of a block over its start: on CUDA ``torch.cuda.max_memory_allocated``; on
    CPU the resident set size (``/proc/self/statm``) polled every 0.5 ms by a thread (tracemalloc
    does not see torch's allocator). The workers run with ``MALLOC_MMAP_THRESHOLD_`` fixed so
    that freed tensors leave the RSS at once (glibc would otherwise keep them in its heap)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(5e-4)

    def __enter__(self):
        import threading
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())
        self.seconds = time.perf_counter() - self.t
        self.mib = (self.peak - self.base) / 2**20


def footprint_worker(tool: str, path: str, query_rank: int | None, device) -> dict:
    """One tool in a fresh process: fit, then pairwise scores, each under :class:`Peak`."""
    task = torch.load(path, weights_only=False)
    d, model = task["d"], mlp(task["d"], 0)
    model.load_state_dict(task["state"])
    model.to(device).eval()
    x, y, xq, yq = (task[k].to(device) for k in ("x", "y", "xq", "yq"))
    res = {"tool": tool, "query_rank": query_rank}
    if tool == "curvkit":
        def run(x, y, xq, yq, peak=contextlib.nullcontext):
            data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
            with peak() as pf:
                est = influence.EKFAC(model, nn.CrossEntropyLoss(), data, damping=DAMPING, kind="empirical").fit()
            with peak() as ps:
                S = est.scores((xq, yq), query_rank=query_rank)
            return pf, ps, S
        run(x[:300], y[:300], xq[:2], yq[:2])  # warm-up: first-call initialisation is not the method's memory
        pf, ps, S = run(x, y, xq, yq, lambda: Peak(device))
    else:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        import logging
        logging.disable(logging.WARNING)

        class CE(Task):
            def compute_train_loss(self, batch, model, sample=False):
                return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

            def compute_measurement(self, batch, model):
                return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        kmodel = prepare_model(model, CE())
        an = Analyzer("mem", kmodel, CE(), cpu=device.type == "cpu", disable_tqdm=True, output_dir=tempfile.mkdtemp())

        def run(x, y, xq, yq, name, peak=contextlib.nullcontext):
            ds = torch.utils.data.TensorDataset(x, y)
            with peak() as pf:
                an.fit_all_factors(name, ds, per_device_batch_size=256,
                                   factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
            sa = ScoreArguments(damping_factor=DAMPING, query_gradient_low_rank=query_rank)
            with peak() as ps:
                an.compute_pairwise_scores(name, name, torch.utils.data.TensorDataset(xq, yq), ds,
                                           per_device_query_batch_size=len(yq), per_device_train_batch_size=256,
                                           score_args=sa)
            return pf, ps, an.load_pairwise_scores(name)["all_modules"]
        run(x[:300], y[:300], xq[:2], yq[:2], "warmup")
        pf, ps, S = run(x, y, xq, yq, "f", lambda: Peak(device))
    torch.save(S.detach().cpu().double(), f"{path}.{tool}.{query_rank}.pt")
    res.update(fit_s=pf.seconds, fit_peak_mib=pf.mib, score_s=ps.seconds, score_peak_mib=ps.mib)
    return res


def footprint(device, quick: bool, ranks: list[int], kronfluence: bool) -> dict:
    """Fit and score time and peak memory, curvkit vs kronfluence (each in a fresh process), and
    the effect of ``query_rank`` on both: EK-FAC (empirical Fisher), the MLP on MNIST-5k (digits
    with ``--quick``) trained here once, 100 test queries (20) against the whole training set."""
    import subprocess
    task_name = "digits" if quick else "mnist5k"
    x, y, xte, yte, _ = make_task(task_name, 0, torch.device("cpu"))
    x, xte = x.reshape(len(y), -1), xte.reshape(len(yte), -1)
    model = mlp(x.shape[1], 0)
    train(model, x, y, 5 if quick else 10, 0)
    nq = 20 if quick else 100
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "task.pt")
    torch.save({"d": x.shape[1], "state": model.state_dict(), "x": x, "y": y, "xq": xte[:nq], "yq": yte[:nq]}, path)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    runs = [("curvkit", None)] + [("curvkit", r) for r in ranks]
    if kronfluence:
        runs += [("kronfluence", None)] + [("kronfluence", r) for r in ranks]
    rows = []
    for tool, r in runs:
        cmd = [sys.executable, __file__, "--worker", tool, "--task", path, "--device", device.type]
        cmd += ["--query-rank", str(r)] if r is not None else []
        got = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if got.returncode != 0:
            print(f"{tool} (query_rank={r}) failed:\n{got.stderr[-2000:]}")
            continue
        rows.append(json.loads(got.stdout.strip().splitlines()[-1]))
    ref = torch.load(f"{path}.curvkit.None.pt")
    for row in rows:
        S = torch.load(f"{path}.{row['tool']}.{row['query_rank']}.pt")
        row["spearman_vs_curvkit_full"] = spearman(S, ref)
        row["rel_err_vs_curvkit_full"] = float((S - ref).norm() / ref.norm())
    params = sum(p.numel() for p in model.parameters())
    return {"task": task_name, "train": len(y), "queries": nq, "params": params, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", default="8,32", help="query_rank values of the footprint table")
    ap.add_argument("--worker", choices=["curvkit", "kronfluence"], help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--query-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(footprint_worker(args.worker, args.task, args.query_rank, device)))
        return
    seeds = [0] if args.quick else [0, 1, 2]
    tasks = ["digits"] if args.quick else ["digits", "mnist5k"]
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "damping": DAMPING, "mislabel": {}}
    for task in tasks:
        runs = [mislabel(task, s, device, 30 if task == "digits" else 15, args.model) for s in seeds]
        results["mislabel"][task] = runs
        print(f"\n{task}: fraction of flipped labels found (10% flipped; {len(seeds)} seed(s), mean +- sd)")
        print(f"{'ranking':10s} {'@10%':>14s} {'@20%':>14s}")
        for m in ("ekfac", "tracin", "identity", "loss"):
            a = np.array([[r[m]["at10"], r[m]["at20"]] for r in runs])
            print(f"{m:10s} {a[:, 0].mean():8.3f}+-{a[:, 0].std():.3f} {a[:, 1].mean():8.3f}+-{a[:, 1].std():.3f}")
        print("test accuracy:", [round(r["test_acc"], 3) for r in runs], " EK-FAC fit+self s:",
              [round(r["ekfac_s"], 2) for r in runs])
    results["model"] = args.model
    kf = None if args.no_kronfluence else vs_kronfluence(device, args.quick)
    if kf is not None:
        results["kronfluence"] = kf
        print("\nvs kronfluence (EK-FAC, empirical Fisher, damping %g, %d queries x %d train)" % (DAMPING, kf["queries"], kf["train"]))
        for k, v in kf.items():
            print(f"  {k:22s} {v:.4f}" if isinstance(v, float) else f"  {k:22s} {v}")
    fp = footprint(device, args.quick, [int(r) for r in args.ranks.split(",") if r], not args.no_kronfluence)
    results["footprint"] = fp
    print(f"\nfit and score: time and peak memory over the start of each phase ({fp['task']} MLP, {fp['params']:,} "
          f"parameters, {fp['queries']} queries x {fp['train']:,} train; EK-FAC, empirical Fisher; one fresh process each; "
          f"{'CUDA max_memory_allocated' if device.type == 'cuda' else 'CPU resident set, polled'})")
    print(f"{'tool':12s} {'rank':>5s} {'fit s':>7s} {'fit MiB':>8s} {'score s':>8s} {'score MiB':>9s} "
          f"{'spearman':>9s} {'rel err':>9s}")
    for row in fp["rows"]:
        print(f"{row['tool']:12s} {str(row['query_rank'] or 'full'):>5s} {row['fit_s']:7.2f} {row['fit_peak_mib']:8.1f} "
              f"{row['score_s']:8.2f} {row['score_peak_mib']:9.1f} {row['spearman_vs_curvkit_full']:9.4f} "
              f"{row['rel_err_vs_curvkit_full']:9.2e}")
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results" / "influence"
    dest.mkdir(parents=True, exist_ok=True)
    stem = "influence" + ("_cnn" if args.model == "cnn" else "") + ("_quick" if args.quick else "")
    (dest / f"{stem}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
