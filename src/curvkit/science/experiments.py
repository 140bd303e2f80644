"""Seven curvature phenomena of training, each reproduced in seconds to a minute or two on a CPU
with :class:`curvkit.monitor.CurvatureMonitor` on scikit-learn's digits (shipped in the package,
no download). Each writes ``NAME.png`` and ``NAME.json`` (the setting, what was measured, the
criterion stated before running, and ``"PASS"`` or ``"FAIL"``).

Run one with ``curvkit experiment NAME`` (``--out DIR``, ``--quick`` for a reduced size), all
with ``curvkit experiment all``; or :func:`run` from Python.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..plotting import pyplot

F = nn.functional


# ------------------------------------------------------------------------------ shared setting
def digits_flat(n: int = 1000) -> tuple[Tensor, Tensor]:
    """The first ``n`` digits as (n, 64) inputs in [0, 1] and labels."""
    from ..datasets import digits

    x, y = digits()
    return x.reshape(len(y), -1)[:n], y[:n]


def mlp(width: int = 64, depth: int = 2, seed: int = 0, din: int = 64, dout: int = 10,
        act: type = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = din
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, dout))


def _finish(name: str, out: Path, setting: dict, measured: dict, criterion: str, passed: bool,
            seconds: float) -> dict:
    result = {"experiment": name, "setting": setting, "measured": measured, "criterion": criterion,
              "result": "PASS" if passed else "FAIL", "seconds": round(seconds, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _train_gd(model, loss_fn, data, opt, mon, steps: int) -> None:
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        mon.step()


def _series(mon, name: str) -> tuple[list[int], list[float]]:
    rs = [r for r in mon.history if not r.nonfinite and name in r.values]
    return [r.step for r in rs], [r.top(name) for r in rs]


# ------------------------------------------------------------------------------ 1. EoS for GD
def edge_of_stability(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Full-batch gradient descent on MSE (one-hot targets), a tanh MLP on 1,000 digits, at three
    learning rates: the sharpness rises until it reaches 2/lr and hovers there (Cohen et al. 2021)."""
    from ..monitor import CurvatureMonitor

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    Y = F.one_hot(y, 10).float()
    lrs, steps, every = ((1.0,), 300, 25) if quick else ((0.5, 1.0, 2.0), 1500, 25)
    fig, axes = pyplot().subplots(2, 1, figsize=(7, 6), sharex=True)
    measured, ok = {}, True
    for lr in lrs:
        model = mlp(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        mon = CurvatureMonitor(model, nn.MSELoss(), (x, Y), every=every, optimizer=opt, seed=seed)
        _train_gd(model, nn.MSELoss(), (x, Y), opt, mon, steps)
        s, v = _series(mon, "sharpness")
        loss = [r.loss for r in mon.history]
        last = [val for st, val in zip(s, v) if st >= 2 * steps / 3]
        rel = [val * lr / 2 for val in last]
        within = sum(0.8 <= r <= 1.2 for r in rel) / len(rel)
        median = sorted(rel)[len(rel) // 2]
        falling = loss[-1] < loss[int(len(loss) * 2 / 3)]
        passed = 0.8 <= median <= 1.2 and within >= 0.75 and falling
        ok &= passed
        measured[f"lr={lr:g}"] = {"threshold_2_over_lr": 2 / lr, "median_sharpness_over_threshold_last_third": median,
                                  "fraction_within_20pct_last_third": within, "loss_at_2_3": loss[int(len(loss) * 2 / 3)],
                                  "loss_end": loss[-1], "initial_sharpness": v[0], "pass": passed,
                                  "mean_products_per_measurement": sum(r.products["sharpness"] for r in mon.history[1:])
                                  / max(1, len(mon.history) - 1)}
        line, = axes[0].plot(s, v, ".-", ms=3, label=f"η = {lr:g}")
        axes[0].axhline(2 / lr, ls="--", color=line.get_color(), lw=1)
        axes[1].semilogy([r.step for r in mon.history], loss, color=line.get_color())
    axes[0].set_ylabel("sharpness λ_max (dashed: 2/η)")
    axes[1].set_ylabel("training loss (MSE)")
    axes[1].set_xlabel("step (full-batch gradient descent)")
    axes[0].legend()
    axes[0].set_title("Edge of stability: the sharpness rises to 2/η and hovers there")
    _save(fig, out / "edge_of_stability.png")
    crit = ("for every learning rate: over the last third of training the median of lambda_max * lr / 2 is in "
            "[0.8, 1.2] and at least 75% of the measurements are, and the loss at the end is below the loss at 2/3")
    return _finish("edge_of_stability", out, {"model": "MLP 64-64-64-10 tanh", "loss": "MSE on one-hot",
                                              "data": "digits[:1000]", "steps": steps, "every": every, "lrs": lrs},
                   measured, crit, ok, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ 2. EoS for Adam
def adam_edge_of_stability(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Full-batch Adam: the preconditioned sharpness lambda_max(P^-1 H) rises to
    2 (1 + beta1) / ((1 - beta1) lr) = 38 / lr and hovers there (Cohen et al. 2022)."""
    from ..monitor import CurvatureMonitor, adam_threshold

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    Y = F.one_hot(y, 10).float()
    lrs, steps, every = ((3e-3,), 300, 25) if quick else ((1e-3, 3e-3), 1200, 25)
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    measured, ok = {}, True
    for lr in lrs:
        model = mlp(seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
        mon = CurvatureMonitor(model, nn.MSELoss(), (x, Y), every=every, optimizer=opt, seed=seed,
                               quantities=("preconditioned_sharpness",))
        _train_gd(model, nn.MSELoss(), (x, Y), opt, mon, steps)
        s, v = _series(mon, "preconditioned_sharpness")
        thr = adam_threshold(lr, 0.9)
        rel = [val / thr for st, val in zip(s, v) if st >= 2 * steps / 3]
        median = sorted(rel)[len(rel) // 2]
        within = sum(0.8 <= r <= 1.2 for r in rel) / len(rel)
        passed = 0.8 <= median <= 1.2 and within >= 0.75
        ok &= passed
        measured[f"lr={lr:g}"] = {"threshold": thr, "median_over_threshold_last_third": median,
                                  "fraction_within_20pct_last_third": within, "initial": v[0],
                                  "loss_end": mon.history[-1].loss, "pass": passed}
        line, = ax.plot(s, v, ".-", ms=3, label=f"η = {lr:g}")
        ax.axhline(thr, ls="--", color=line.get_color(), lw=1)
    ax.set_ylabel("λ_max(P⁻¹H) (dashed: 38/η)")
    ax.set_xlabel("step (full-batch Adam, β1 = 0.9)")
    ax.legend()
    _save(fig, out / "adam_edge_of_stability.png")
    crit = ("for every learning rate: over the last third the median of the preconditioned sharpness over "
            "2(1+b1)/((1-b1) lr) is in [0.8, 1.2] and at least 75% of the measurements are")
    return _finish("adam_edge_of_stability", out, {"model": "MLP 64-64-64-10 tanh", "loss": "MSE on one-hot",
                                                   "data": "digits[:1000]", "steps": steps, "lrs": lrs,
                                                   "betas": [0.9, 0.999], "eps": 1e-7},
                   measured, crit, ok, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ 3. progressive sharpening
def progressive_sharpening(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Gradient descent at a small learning rate (2/lr far above the sharpness): the sharpness
    keeps rising during training (Cohen et al. 2021, Jastrzebski et al. 2020)."""
    from ..monitor import CurvatureMonitor

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    Y = F.one_hot(y, 10).float()
    lr, steps, every = (0.1, 200, 25) if quick else (0.1, 2000, 50)
    model = mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = CurvatureMonitor(model, nn.MSELoss(), (x, Y), every=every, optimizer=opt, seed=seed)
    _train_gd(model, nn.MSELoss(), (x, Y), opt, mon, steps)
    s, v = _series(mon, "sharpness")
    rho = _spearman(s, v)
    ratio = v[-1] / v[0]
    passed = ratio >= 1.5 and rho >= 0.8 and max(v) < 0.8 * 2 / lr
    fig, ax = pyplot().subplots(figsize=(7, 3.4))
    ax.plot(s, v, ".-")
    ax.set_xlabel("step (full-batch gradient descent, η = 0.1; 2/η = 20)")
    ax.set_ylabel("sharpness λ_max")
    ax.set_title("Progressive sharpening")
    _save(fig, out / "progressive_sharpening.png")
    crit = ("final sharpness >= 1.5x the initial, Spearman correlation of sharpness with step >= 0.8, and the "
            "sharpness stays below 0.8 * 2/lr (no edge-of-stability regulation)")
    return _finish("progressive_sharpening", out, {"model": "MLP 64-64-64-10 tanh", "loss": "MSE", "lr": lr,
                                                   "steps": steps},
                   {"initial": v[0], "final": v[-1], "ratio": ratio, "spearman": rho, "max_over_2_lr": max(v) * lr / 2},
                   crit, passed, time.perf_counter() - t0)


def _spearman(a: list, b: list) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _save(fig, path: Path) -> None:
    """Lay out, write (PNG, 80 dpi: small enough to commit) and close an experiment's figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)


# ------------------------------------------------------------------------------ 4. gradient in the top subspace
def gradient_subspace(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """SGD (batch 64, lr 0.5) with cross-entropy on 10 classes: the gradient lies almost entirely
    in the top-10 Hessian eigenspace after the first steps (Gur-Ari, Roberts, Dyer 2018). This
    needs a large learning rate (here near 2/sharpness), where SGD bounces along the top directions:
    at lr 0.1 we measured a median of 0.64, and full-batch GD at lr 0.1 damps the top directions to
    an overlap near 0 (stable GD contracts them by 1 - lr lambda per step)."""
    from ..monitor import CurvatureMonitor

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    steps, every = (150, 15) if quick else (800, 25)
    model = mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=every, k=10, optimizer=opt, seed=seed,
                           quantities=("grad_overlap",), gradient="probe", tol=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        mon.step()
    s, v = _series(mon, "grad_overlap")
    after = [val for st, val in zip(s, v) if st >= 0.2 * steps]
    median = sorted(after)[len(after) // 2]
    passed = median > 0.9
    fig, ax = pyplot().subplots(figsize=(7, 3.4))
    ax.plot(s, v, ".-")
    ax.axhline(0.9, ls="--", color="tab:red", lw=1)
    ax.axvline(0.2 * steps, ls=":", color="0.5")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step (SGD, batch 64, η = 0.5)")
    ax.set_ylabel("‖V₁₀ᵀg‖² / ‖g‖²")
    ax.set_title("The gradient in the top-10 Hessian eigenspace")
    _save(fig, out / "gradient_subspace.png")
    crit = ("after the first 20% of training, the median fraction of the gradient (of the 1,000-example probe set) "
            "in the top-10 Hessian eigenspace is > 0.9")
    return _finish("gradient_subspace", out, {"model": "MLP 64-64-64-10 tanh", "loss": "cross-entropy",
                                              "optimizer": "SGD lr 0.5 batch 64", "steps": steps, "k": 10},
                   {"median_after_initial_phase": median, "first": v[0], "values": v}, crit, passed,
                   time.perf_counter() - t0)


# ------------------------------------------------------------------------------ 5. k-1 outliers
def class_outliers(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """After training a 10-class classifier, the GGN has k-1 = 9 outlier eigenvalues above its
    bulk (Sagun et al. 2017, Papyan 2019), counted by :func:`curvkit.outliers`, for three seeds.
    A ReLU MLP trained by SGD to about 95% training accuracy; with tanh units (centred features,
    whose class means stand out less) or trained to 100% (Adam, the GGN collapses onto the few
    examples near the boundary) the top-20 decays smoothly with no k-1 structure: we measured a
    count of 20 (everything above the bulk edge) for all three seeds."""
    from ..linalg import eigenvalues, outliers, spectral_density
    from ..operators import ggn

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    seeds, steps = ((seed,), 150) if quick else ((seed, seed + 1, seed + 2), 400)
    counts, measured = [], {}
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    for s in seeds:
        model = mlp(seed=s, act=nn.ReLU)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(s)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        G = ggn(model, nn.CrossEntropyLoss(), (x, y))
        e = eigenvalues(G, k=20, tol=1e-4, seed=s)
        d = spectral_density(G, iterations=60, probes=8, seed=s)
        o = outliers(G, eigen=e, density=d)
        counts.append(o.count)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        measured[f"seed={s}"] = {"count": o.count, "top20": [float(v) for v in e.values], "bulk_edge": o.bulk_edge,
                                 "threshold": o.threshold, "train_accuracy": acc}
        ax.semilogy(range(1, 21), [float(v) for v in e.values], "o-", ms=3, label=f"seed {s}: {o.count} outliers")
        ax.axhline(o.threshold, ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.axvline(9.5, ls="--", color="0.4", lw=1)
    ax.set_xlabel("index i (dotted: ck.outliers threshold; dashed: k-1 = 9)")
    ax.set_ylabel("GGN eigenvalue λ_i")
    ax.legend(fontsize=8)
    _save(fig, out / "class_outliers.png")
    passed = all(c == 9 for c in counts)
    crit = "ck.outliers counts exactly k-1 = 9 GGN outliers for every seed, after training"
    return _finish("class_outliers", out, {"model": "MLP 64-64-64-10 ReLU", "loss": "cross-entropy",
                                           "optimizer": "SGD lr 0.1 batch 64", "steps": steps, "seeds": list(seeds)},
                   {"counts": counts, **measured}, crit, passed, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ 6. SP vs muP
def mup_width(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """The learning-rate-scaled sharpness ``eta lambda`` (``lambda_max`` of the Hessian
    preconditioned by the per-layer learning rates) at widths 64 and 1024, after a few SGD steps:
    under muP (Yang & Hu 2021, SGD table: input weights and biases lr eta*fan_out (the width; the
    output bias's fan_out is the classes), hidden eta, output eta/width, output init variance
    1/fan_in^2; all relative to width 64) it is width-independent, so a learning rate transfers; under
    standard parametrisation (one lr, PyTorch's init) it grows with width."""
    from ..monitor import CurvatureMonitor

    t0 = time.perf_counter()
    x, y = digits_flat(500)
    widths = (64, 256) if quick else (64, 1024)
    steps = 10 if quick else 20
    measured: dict[str, Any] = {}
    for param in ("SP", "muP"):
        for w in widths:
            model = mlp(width=w, seed=seed)
            base = 0.05
            if param == "SP":
                opt = torch.optim.SGD(model.parameters(), lr=base)
            else:
                with torch.no_grad():  # hidden and output: variance 1/fan_in (hidden), 1/fan_in^2 (output)
                    for m in (model[0], model[2]):
                        m.weight.normal_(0, 1 / math.sqrt(m.in_features))
                    model[4].weight.normal_(0, 1 / model[4].in_features)
                    for m in (model[0], model[2], model[4]):
                        m.bias.zero_()
                # the output bias's fan_out is the classes, not the width: its rate does not scale
                groups = [{"params": [model[0].weight, model[0].bias, model[2].bias], "lr": base * w / 64},
                          {"params": [model[2].weight, model[4].bias], "lr": base},
                          {"params": [model[4].weight], "lr": base * 64 / w}]
                opt = torch.optim.SGD(groups, lr=base)
            mon = CurvatureMonitor(model, nn.CrossEntropyLoss(), (x, y), every=steps, optimizer=opt, seed=seed,
                                   quantities=("preconditioned_sharpness",), tol=1e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(steps + 1):
                idx = torch.randint(0, len(y), (64,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                mon.step()
            r = mon.history[-1]
            # lambda_max of P^-1 H with P = lr / lr_group, lr the first group's: eta*lambda = lr * that
            measured[f"{param} width={w}"] = {"eta_lambda": r.values["preconditioned_sharpness"][0] * r.lr,
                                               "eta_lambda_at_init": mon.history[0].values["preconditioned_sharpness"][0] * r.lr,
                                               "lambda_preconditioned": r.values["preconditioned_sharpness"][0],
                                               "residual": r.errors["preconditioned_sharpness"][0], "step": r.step}
    ratio = {p: measured[f"{p} width={widths[1]}"]["eta_lambda"] / measured[f"{p} width={widths[0]}"]["eta_lambda"]
             for p in ("SP", "muP")}
    passed = 0.5 <= ratio["muP"] <= 2.0 and ratio["SP"] >= 4.0
    fig, ax = pyplot().subplots(figsize=(6, 3.4))
    for p in ("SP", "muP"):
        ax.plot(widths, [measured[f"{p} width={w}"]["eta_lambda"] for w in widths], "o-", label=p)
    ax.axhline(2, ls="--", color="tab:red", lw=1, label="2 (stability)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("η·λ_max (per-layer η)")
    ax.legend()
    _save(fig, out / "mup_width.png")
    crit = (f"eta*lambda at width {widths[1]} over width {widths[0]}: in [0.5, 2] under muP and >= 4 under SP")
    return _finish("mup_width", out, {"model": "MLP 64-w-w-10 tanh", "data": "digits[:500]", "base_lr": 0.05,
                                      "steps": steps, "widths": list(widths)},
                   {"ratio": ratio, **measured}, crit, passed, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ 7. max lr vs batch size
def batch_size_lr(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """The largest stable SGD learning rate against the batch size, predicted from the batch
    sharpness (``2 / E[lambda_max(H_B)]`` over mini-batches of size B, at a point after a short
    warm-up) and found by training at a grid of learning rates."""
    from ..monitor import CurvatureMonitor

    t0 = time.perf_counter()
    x, y = digits_flat(1000)
    sizes = (8, 64) if quick else (4, 16, 64, 256)
    grid = [0.05 * 1.5**i for i in range(14)]
    warm, trial_steps = (50, 100) if quick else (100, 200)
    loss_fn = nn.CrossEntropyLoss()

    def warmed():
        model = mlp(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(warm):
            idx = torch.randint(0, len(y), (32,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        return model

    base = warmed()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    measured: dict[str, Any] = {}
    predicted, found = [], []
    for B in sizes:
        model = warmed()
        mon = CurvatureMonitor(model, loss_fn, (x, y), every=1, lr=0.05, seed=seed, quantities=("batch_sharpness",))
        gen = torch.Generator().manual_seed(seed + B)
        vals = []
        for _ in range(8 if quick else 16):
            idx = torch.randint(0, len(y), (B,), generator=gen)
            vals.append(mon.measure(batch=(x[idx], y[idx])).values["batch_sharpness"])
        lam = sum(vals) / len(vals)
        pred = 2 / lam
        stable = []
        for lr in grid:
            model.load_state_dict(state)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            g2 = torch.Generator().manual_seed(seed + 1)
            ok = True
            with torch.no_grad():
                start = float(loss_fn(model(x), y))
            for _ in range(trial_steps):
                idx = torch.randint(0, len(y), (B,), generator=g2)
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                end = float(loss_fn(model(x), y))
            ok = math.isfinite(end) and end < start
            stable.append(ok)
        lr_max = max([lr for lr, ok in zip(grid, stable) if ok], default=0.0)
        predicted.append(pred)
        found.append(lr_max)
        measured[f"B={B}"] = {"mean_batch_sharpness": lam, "predicted_lr_max": pred, "empirical_lr_max": lr_max,
                              "ratio": lr_max / pred if pred > 0 else None}
    within = all(0.5 <= f / p <= 2.0 for f, p in zip(found, predicted))
    monotone = all(b >= a for a, b in zip(predicted, predicted[1:])) and all(b >= a for a, b in zip(found, found[1:]))
    passed = within and monotone
    fig, ax = pyplot().subplots(figsize=(6, 3.4))
    ax.loglog(sizes, predicted, "o-", label="2 / E[λ_max(H_B)] (batch sharpness)")
    ax.loglog(sizes, found, "s--", label="largest stable η (grid ×1.5)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=8)
    _save(fig, out / "batch_size_lr.png")
    crit = ("for every batch size the largest stable learning rate (loss lower after the trial run, grid x1.5) is "
            "within a factor 2 of 2 / mean batch sharpness, and both are nondecreasing in the batch size")
    return _finish("batch_size_lr", out, {"model": "MLP 64-64-64-10 tanh", "loss": "cross-entropy", "sizes": sizes,
                                          "grid": grid, "warmup_steps": warm, "trial_steps": trial_steps},
                   measured, crit, passed, time.perf_counter() - t0)


@dataclass(frozen=True)
class Experiment:
    name: str
    run: Callable[..., dict]
    summary: str


EXPERIMENTS = {e.name: e for e in (
    Experiment("edge_of_stability", edge_of_stability, "GD: sharpness hovers at 2/lr for three learning rates"),
    Experiment("adam_edge_of_stability", adam_edge_of_stability, "Adam: preconditioned sharpness at 38/lr"),
    Experiment("progressive_sharpening", progressive_sharpening, "GD at small lr: the sharpness keeps rising"),
    Experiment("gradient_subspace", gradient_subspace, "the gradient lies in the top-10 Hessian eigenspace"),
    Experiment("class_outliers", class_outliers, "k-1 GGN outliers for k classes, three seeds"),
    Experiment("mup_width", mup_width, "eta*lambda width-independent under muP, not under SP"),
    Experiment("batch_size_lr", batch_size_lr, "max stable lr against batch size from the batch sharpness"),
)}


def run(name: str, out: str | Path = "experiments", quick: bool = False, seed: int = 0) -> list[dict]:
    """Run experiment ``name`` (or ``"all"``), writing ``NAME.png`` and ``NAME.json`` under ``out``;
    returns the JSON results. Cost: seconds (``quick``) to about a minute or two each on a CPU."""
    if name != "all" and name not in EXPERIMENTS:
        raise ArgumentError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(EXPERIMENTS) if name == "all" else [name]
    return [EXPERIMENTS[n].run(out, quick=quick, seed=seed) for n in names]


__all__ = ["EXPERIMENTS", "Experiment", "run"]
