"""``ck.analyze``: a curvature report of a model on its data, composed from the operators and the
linear algebra (no linear algebra of its own: DESIGN.md rule 2)."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..progress import progress as progress_bar
from ..errors import ArgumentError
from ..model import Risk

SCHEMA_VERSION = "curvkit.report/1"


@dataclass
class Report:
    """A curvature report; every section is plain JSON-able data (see ``report.schema.json``).

    Sections: ``settings`` (everything needed to reproduce it), ``model``, ``data``, ``loss``,
    ``accuracy``, ``hessian`` and ``ggn`` (top-k eigenvalues with residuals), ``trace``,
    ``density``, ``layers``, ``gradient``, ``outliers``, ``cost`` (products and seconds per quantity);
    ``condition`` (the GGN's condition number, a lower bound) when asked for.
    """

    settings: dict
    model: dict
    data: dict
    loss: dict
    accuracy: dict
    hessian: dict
    ggn: dict
    trace: dict
    density: dict
    layers: list
    gradient: dict
    outliers: dict
    cost: dict
    schema: str = SCHEMA_VERSION
    warnings: list = field(default_factory=list)
    condition: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        """The report as JSON (schema ``report.schema.json``, shipped with the package). Free."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A human summary with the tables. Free."""
        from .markdown import render

        return render(self)

    def plot(self, directory: str | Path) -> list[Path]:
        """Write ``spectrum.png`` and ``layers.png`` into ``directory`` (needs matplotlib). Free."""
        from .plots import plot_layers, plot_spectrum

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        return [plot_spectrum(self, d / "spectrum.png"), plot_layers(self, d / "layers.png")]

    def save(self, directory: str | Path) -> list[Path]:
        """Write report.json, report.md, spectrum.png and layers.png into ``directory`` and return
        their paths. Free.

        Under ``torch.distributed`` (an initialised process group), only rank 0 writes: on every
        other rank ``save`` writes nothing (not even the folder) and returns ``[]``, so ranks that
        share a file system do not race on the same files. Every rank holds the same report.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return []
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.json").write_text(self.to_json() + "\n")
        (d / "report.md").write_text(self.to_markdown())
        return [d / "report.json", d / "report.md", *self.plot(d)]


def schema() -> dict:
    """The JSON schema of ``Report.to_json()``."""
    return json.loads((Path(__file__).with_name("report.schema.json")).read_text())


# ----------------------------------------------------------------------------------------------
def analyze(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    k: int = 12,
    probes: int = 30,
    density_probes: int = 4,
    density_iterations: int = 60,
    seed: int = 0,
    params: Any = None,
    heldout: Any = None,
    tol: float = 1e-3,
    block_size: int = 4,
    max_matvecs: int = 400,
    progress: bool | None = None,
    description: str | None = None,
    settings: dict | None = None,
    condition: bool = False,
) -> Report:
    """A curvature report of ``loss_fn(model(inputs), targets)`` over ``data`` (model in eval mode).

    Composes ``ck.hessian`` / ``ck.ggn`` with ``ck.eigenvalues``, ``ck.trace`` and
    ``ck.spectral_density`` (also ``by="layer"``); ``settings`` adds entries to the report's
    settings (the CLI records its command there). ``heldout``: a batch or batches for a held-out
    loss and accuracy.

    Cost, in operator products (columns) and passes over ``data``:
    top-k Hessian and GGN eigenpairs, each at most ``max_matvecs`` (block Lanczos, blocks of
    ``block_size``); the Hessian trace, ``probes`` (Hutch++); per-layer traces, ``probes`` per
    layer; per-layer top eigenvalue, at most ``max_matvecs`` per layer (typically ~30-60);
    the spectral density, ``density_probes * density_iterations``; plus one gradient pass over
    ``data`` and one forward pass over ``heldout``. Each block product is one pass over ``data``.
    The report's ``cost`` section records what was actually spent, and the seconds.

    ``condition=True`` adds the GGN's condition number λ_max/λ_min (the conditioning of, e.g., a
    physics-informed loss): the smallest GGN eigenvalue by Lanczos, at most ``max_matvecs`` more
    products. Reported as a lower bound, ``θ_max/θ_min`` of Ritz values (Ritz values lie inside
    the spectrum, so it never overstates), with ``θ_min``'s residual and whether it converged; an
    eigenvalue cluster at 0 (common in over-parametrised networks) is out of Lanczos' reach without
    shift-invert, and then the bound is loose and ``converged`` is False.
    """
    from .. import eigenvalues, ggn, hessian, outliers as find_outliers, spectral_density, trace
    from ..compress.sensitivity import layer_sensitivity

    if not isinstance(k, int) or k < 1:
        raise ArgumentError(f"k must be a positive integer, got {k!r}")
    if not isinstance(density_probes, int) or density_probes < 2:
        raise ArgumentError(f"density_probes must be an integer >= 2 (for the density's error bar), got {density_probes!r}")
    if not isinstance(probes, int) or probes < 4:
        raise ArgumentError(f"probes must be an integer >= 4 (Hutch++ needs 4 for a standard error), got {probes!r}")
    t_start = time.perf_counter()
    warn_log: list[str] = []
    cost: dict[str, dict] = {}
    steps = ["loss and gradient", "Hessian top-k", "GGN top-k", *(["GGN smallest eigenvalue"] if condition else []),
             "trace", "per-layer traces", "per-layer top eigenvalue", "spectral density"]
    bar = progress_bar(total=len(steps), desc="curvkit analyze", enabled=progress, unit="step")

    @contextlib.contextmanager
    def step(name: str) -> Iterator[dict]:
        bar.set_description(f"curvkit analyze: {name}")
        rec = {"products": 0, "passes": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        yield rec
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        cost[name] = rec
        bar.update(1)

    try:
        with _warnings_to(warn_log):
            H = hessian(model, loss_fn, data, params)
            n = H.shape[0]
            if k >= n:
                raise ArgumentError(f"k={k} must be below the number of analysed parameters ({n}); lower --k")

            with step("loss and gradient") as rec:
                loss, acc, grad, num_classes, examples, n_batches = _loss_and_gradient(H)
                rec["passes"] = 1
            held = {"loss": None, "accuracy": None, "examples": 0}
            if heldout is not None:
                held = _evaluate(H, heldout)

            lanczos = dict(tol=tol, seed=seed, block_size=block_size, max_matvecs=max_matvecs, progress=progress)
            with step("Hessian top-k") as rec:
                eh = eigenvalues(H, k=k, **lanczos)
                rec["products"], rec["passes"] = eh.matvecs, eh.iterations
            with step("GGN top-k") as rec:
                G = ggn(model, loss_fn, data, params)
                eg = eigenvalues(G, k=k, **lanczos)
                rec["products"], rec["passes"] = eg.matvecs, eg.iterations
            cond = None
            if condition:
                with step("GGN smallest eigenvalue") as rec:
                    lo = eigenvalues(G, k=1, which="smallest", **{**lanczos, "block_size": 1})
                    rec["products"], rec["passes"] = lo.matvecs, lo.iterations
                theta_min, theta_max = float(lo.values[0]), float(eg.values[0])
                cond = {"lambda_max": theta_max, "lambda_min": theta_min, "lambda_min_residual": float(lo.residuals[0]),
                        "converged": bool(lo.converged),
                        "lower_bound": theta_max / theta_min if theta_min > 0 else None,
                        "definition": "theta_max / theta_min of GGN Ritz values: a lower bound on lambda_max / lambda_min; "
                                      "null where theta_min <= 0 (a singular GGN)",
                        **cost["GGN smallest eigenvalue"]}
            with step("trace") as rec:
                tr = trace(H, probes=probes, seed=seed)
                rec["products"], rec["passes"] = tr.matvecs, None  # Hutch++: 3 block products per 64 probes
            # the per-layer section is compress.sensitivity's code path: HAWQ's sensitivities and
            # this table are the same blocks, algorithms and seeds (DESIGN.md rule 2)
            bar.set_description("curvkit analyze: per-layer traces and top eigenvalues")
            sens = layer_sensitivity(H, quantities=("trace", "top_eigenvalue"), probes=probes, **lanczos)
            cost["per-layer traces"] = sens.cost["trace"]
            cost["per-layer top eigenvalue"] = sens.cost["top_eigenvalue"]
            bar.update(2)
            with step("spectral density") as rec:
                dens = spectral_density(H, iterations=density_iterations, probes=density_probes, grid=1000,
                                        seed=seed, progress=progress)
                rec["products"], rec["passes"] = dens.matvecs, int(dens.nodes.shape[1])
    finally:
        bar.close()

    # the fraction of the gradient in span(V): V orthonormal, so ||V^T g||^2 / ||g||^2
    V = eh.vectors
    g = grad.to(V.dtype)
    gnorm2 = float(g @ g)
    frac = float((V.T @ g).square().sum()) / gnorm2 if gnorm2 > 0 else 0.0
    density = _density_section(dens, n)
    out = find_outliers(eigen=eh, density=dens)  # the public rule (ck.outliers): SLQ bulk edge and gaps
    layer_rows = sens.rows()
    n_total = sum(p.numel() for p in model.parameters())
    first_x, _ = H.data.first()
    sets = {
        "seed": seed, "k": k, "probes": probes, "density_probes": density_probes,
        "density_iterations": density_iterations, "block_size": block_size, "tol": tol,
        "max_matvecs": max_matvecs, "params": None if params is None else str(params),
        "mode": "eval", "dtype": str(H.dtype).replace("torch.", ""), "device": str(H.device),
        "threads": torch.get_num_threads(), "curvkit": _version(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "loss_fn": _describe(loss_fn), "reduction": H.reduction,
    }
    sets.update(settings or {})
    total_products = sum(r["products"] for r in cost.values())
    return Report(
        settings=sets,
        model={"description": description or type(model).__name__, "parameters": n_total, "analysed_parameters": n,
               "num_classes": num_classes},
        data={"examples": examples, "batches": n_batches, "batch_sizes": list(H.data.sizes),
              "ranks": H.risk.world,
              "input_shape": list(first_x.shape[1:]) if isinstance(first_x, Tensor) else None,
              "heldout_examples": held["examples"]},
        loss={"data": loss, "heldout": held["loss"]},
        accuracy={"data": acc, "heldout": held["accuracy"]},
        hessian=_eig_section(eh, cost["Hessian top-k"]),
        ggn=_eig_section(eg, cost["GGN top-k"]),
        trace={"value": tr.value, "stderr": tr.stderr, "method": tr.method, "probes": tr.probes, "samples": tr.samples,
               **cost["trace"]},
        density=density,
        layers=layer_rows,
        gradient={"norm": math.sqrt(gnorm2), "fraction_in_top_k": frac, "k": k,
                  "definition": "||V^T g||^2 / ||g||^2, V the top-k Hessian eigenvectors, g the gradient "
                                "of the same loss over the same data"},
        outliers={"count": out.count, "gap_ratio": out.gap_ratio, "threshold": out.threshold,
                  "capped_at_k": out.capped_at_k, "num_classes": num_classes, "rule": out.rule},
        cost={"quantities": cost, "total_products": total_products,
              "total_seconds": round(time.perf_counter() - t_start, 3)},
        warnings=warn_log,
        condition=cond,
    )


# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _warnings_to(log: list[str]) -> Iterator[None]:
    """Keep curvkit's warnings (e.g. no convergence) in the report as well as showing them."""
    import warnings

    from ..errors import CurvkitWarning

    shown = warnings.showwarning

    def show(message, category, *a, **kw):
        if issubclass(category, CurvkitWarning):
            log.append(f"{category.__name__}: {message}")
        shown(message, category, *a, **kw)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _is_classification(out: Any, y: Tensor) -> bool:
    return (isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] > 1 and y.dim() == 1
            and not y.is_floating_point())


def _loss_and_gradient(H) -> tuple[float, float | None, Tensor, int | None, int, int]:
    """Loss, accuracy and flat gradient of the loss over H's data, weighted as H weights its
    batches, with the number of examples and of batches: one forward and backward pass of the one
    data loop (:class:`curvkit.model.Risk`), so under torch.distributed all of them are over
    every rank's data."""
    seen = {"classes": None, "cls": True, "keys": set()}

    def count(out: Any, y: Tensor, key: int) -> list[Tensor]:
        seen["cls"] = seen["cls"] and _is_classification(out, y)
        hits = torch.zeros((), dtype=torch.float64, device=y.device)
        if seen["cls"]:
            hits = (out.argmax(1) == y).sum().to(torch.float64)
            seen["classes"] = int(out.shape[1])
        first = key not in seen["keys"]  # the pieces of a batch (max_batch) share its key: count it once
        seen["keys"].add(key)
        return [hits.reshape(1), torch.full((1,), float(first), dtype=torch.float64, device=y.device)]

    totals = H.risk.gradient_pass(count)
    grad, hits, batches = totals.mean(totals.sums[0]), float(totals.sums[1]), int(float(totals.sums[2]))
    acc = hits / totals.examples if seen["cls"] else None
    return totals.loss, acc, grad, seen["classes"] if seen["cls"] else None, totals.examples, batches


def _evaluate(H, data: Any) -> dict:
    """Loss and accuracy over held-out batches, weighted as the operators weight batches (the
    same data loop, :class:`curvkit.model.Risk`): one forward pass."""
    r = H.risk
    risk = Risk(r.model, r.loss_fn, data, space=r.space, spec=r.spec, mode="eval", output=r.output,
                max_batch=r.max_batch, distributed=r.group is not None)
    f = risk.function()
    seen = {"correct": 0, "cls": True}

    def batch(x: Any, y: Tensor, _: int):
        with torch.no_grad():
            out = f(risk.space.detached(), x)
            seen["cls"] = seen["cls"] and _is_classification(out, y)
            hit = (out.argmax(1) == y).sum().to(torch.float64) if seen["cls"] else torch.zeros((), dtype=torch.float64)
            return [hit.reshape(1)], risk.loss(out, y), risk.weight(out, y)

    totals = risk.accumulate(batch, what="held-out loss")
    n = totals.examples
    return {"loss": totals.loss, "accuracy": float(totals.sums[0]) / n if seen["cls"] else None, "examples": n}


def _eig_section(r, rec: dict) -> dict:
    vals = [float(v) for v in r.values]
    res = [float(v) for v in r.residuals]
    return {"values": vals, "residuals": res, "converged": bool(r.converged), "iterations": int(r.iterations),
            **rec}


def _density_section(d, n: int) -> dict:
    """The density with its pointwise standard error over probes (``DensityResult.stderr``)."""
    return {
        "grid": d.grid.tolist(), "density": d.density.tolist(), "density_stderr": d.stderr.tolist(),
        "sigma": float(d.sigma), "probes": int(d.nodes.shape[0]), "iterations": int(d.nodes.shape[1]),
        "nodes": d.nodes.tolist(), "weights": d.weights.tolist(), "node_min": float(d.nodes.min()),
        "node_max": float(d.nodes.max()), "products": d.matvecs,
    }


def _describe(loss_fn: Any) -> str:
    if isinstance(loss_fn, nn.Module):
        return repr(loss_fn)
    return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)


def _version() -> str:
    from .. import __version__

    return __version__
