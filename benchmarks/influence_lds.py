"""Linear datamodeling score (LDS) of curvkit's influence estimators on digits.

    PYTHONPATH=$PWD/src:$PWD python benchmarks/influence_lds.py              # 100 subsets, 50 queries
    PYTHONPATH=$PWD/src:$PWD python benchmarks/influence_lds.py --quick      # 20 subsets (smoke test)

The model (an MLP 64-32-10, Adam) is trained on digits' training split; each estimator gives the
(query x train) scores ``tau(q, i)`` of 50 held-out queries. Then ``--subsets`` random halves
``S_j`` of the training set are retrained from the same initialisation with the same schedule,
and each query's loss ``f_j(q)`` measured. An influence score predicts ``f_j(q) ~ const -
sum_{i in S_j} tau(q, i)`` (score > 0: helpful, it lowers the query's loss); the LDS is the
Spearman correlation over subsets between the prediction and the measured loss, averaged over
the queries (Park et al. 2023). Retraining noise caps it below 1: ``--seeds-per-subset`` > 1
averages that noise out of ``f_j``. Prints a table; writes JSON under ``$OUT`` if set, else
``benchmarks/results/influence/``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from benchmarks.influence import train as train_with_checkpoints
from curvkit import datasets, influence


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def train(x, y, seed: int, order_seed: int, epochs: int = 40):
    """The same initialisation (``seed``) for every subset; ``order_seed`` draws the batch order."""
    model = mlp(seed)
    ckpts, lr = train_with_checkpoints(model, x, y, epochs, order_seed)
    return model.eval(), ckpts, lr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seeds-per-subset", type=int, default=2)
    ap.add_argument("--damping", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.subsets, args.queries, args.seeds_per_subset = 20, 20, 1
    torch.set_num_threads(1)
    x, y = datasets.digits()
    x = x.reshape(len(y), -1)
    (xtr, ytr), (xte, yte) = datasets.split(x, y, test_fraction=0.2, seed=0)
    xq, yq = xte[: args.queries], yte[: args.queries]
    n = len(ytr)
    model, ckpts, lr = train(xtr, ytr, seed=0, order_seed=0)
    data = [(xtr[i : i + 256], ytr[i : i + 256]) for i in range(0, n, 256)]
    lossf = nn.CrossEntropyLoss()
    query = (xq, yq)

    scores, seconds = {}, {}
    for damping in args.damping:
        for name, make in (("EK-FAC", lambda d=damping: influence.EKFAC(model, lossf, data, damping=d)),
                           ("Exact (GGN)", lambda d=damping: influence.Exact(model, lossf, data, damping=d)),
                           ("CG (GGN)", lambda d=damping: influence.CG(model, lossf, data, damping=d))):
            t = time.perf_counter()
            scores[f"{name}, damping {damping:g}"] = make().fit().scores(query)
            seconds[f"{name}, damping {damping:g}"] = time.perf_counter() - t
    for name, make in (("TracIn (5 checkpoints)", lambda: influence.TracIn(model, lossf, data, ckpts, lr=lr)),
                       ("Identity", lambda: influence.Identity(model, lossf, data))):
        t = time.perf_counter()
        scores[name] = make().fit().scores(query)
        seconds[name] = time.perf_counter() - t

    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(args.subsets, n, dtype=torch.bool)
    losses = torch.zeros(args.subsets, len(yq), dtype=torch.float64)
    t = time.perf_counter()
    for j in range(args.subsets):
        masks[j, torch.randperm(n, generator=g)[: n // 2]] = True
        for s in range(args.seeds_per_subset):
            m, _, _ = train(xtr[masks[j]], ytr[masks[j]], seed=0, order_seed=1000 * j + s)
            with torch.no_grad():
                losses[j] += nn.functional.cross_entropy(m(xq), yq, reduction="none").double()
    losses /= args.seeds_per_subset
    retrain_s = time.perf_counter() - t

    rows = {}
    for name, tau in scores.items():
        pred = -(masks.double() @ tau.double().T)  # (subsets, queries): predicted loss up to a constant
        per_q = [spearmanr(pred[:, q].numpy(), losses[:, q].numpy()).statistic for q in range(len(yq))]
        rows[name] = {"lds": float(np.nanmean(per_q)), "lds_sd_over_queries": float(np.nanstd(per_q)),
                      "seconds": round(seconds[name], 3)}
    print(f"LDS on digits ({n} training examples, MLP 64-32-10, {args.subsets} random halves x "
          f"{args.seeds_per_subset} retrainings, {len(yq)} queries; retraining took {retrain_s:.1f} s)")
    print(f"{'estimator':32s} {'LDS':>8s} {'sd':>7s} {'fit+score s':>12s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['lds']:8.3f} {r['lds_sd_over_queries']:7.3f} {r['seconds']:12.2f}")
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results" / "influence"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ("lds_quick.json" if args.quick else "lds.json")).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "torch": torch.__version__, "args": vars(args),
         "retrain_seconds": retrain_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
