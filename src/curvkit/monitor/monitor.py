"""``CurvatureMonitor``: curvature measured every few steps of any training loop."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, CurvkitWarning, ModelError, NonFiniteError
from ..linalg import eigenvalues, grad_overlap, outliers, trace
from ..linear_operator import DiagonalOperator
from ..model import Risk
from ..operators import ggn, hessian
from ..progress import progress as progress_bar
from ..seeding import seed_int
from .preconditioner import _sgd_group_threshold, preconditioner, sgd_threshold

QUANTITIES = ("sharpness", "preconditioned_sharpness", "trace", "grad_overlap", "outliers", "layer_sharpness",
              "batch_sharpness")
Gradient = Literal["auto", "batch", "probe"]


class BudgetWarning(CurvkitWarning):
    """The monitor stretched ``every`` to keep the curvature work within its ``budget``."""


@dataclass
class Record:
    """One measurement. ``values[name]``: the quantity (a list of the top-k values for the
    sharpness kinds, a float for ``trace``/``grad_overlap``/``batch_sharpness``, the count for
    ``outliers``, ``{layer: value}`` for ``layer_sharpness``); ``errors[name]``: its residuals
    (Lanczos ``||A v - lambda v||``) or standard error (trace); ``products`` and ``seconds`` per
    quantity; ``thresholds[name]``: the stability threshold at the current learning rate (None
    where none applies); ``info``: what else was learnt (bulk edge, gradient source, ...);
    ``nonfinite``: the measurement met NaN/inf (``message`` says where) and holds no values."""

    step: int
    lr: float | None
    every: int  # the period from this measurement to the next (``budget`` may stretch it)
    loss: float | None = None
    values: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    products: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    converged: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    nonfinite: bool = False
    message: str | None = None
    budget_fraction: float | None = None

    def top(self, name: str = "sharpness") -> float | None:
        """The leading value of a quantity (the top eigenvalue for the sharpness kinds), or None."""
        v = self.values.get(name)
        if isinstance(v, list):
            return v[0] if v else None
        if isinstance(v, dict):
            return max(v.values()) if v else None
        return v

    def to_dict(self) -> dict:
        return asdict(self)


class CurvatureMonitor:
    r"""Curvature of a model measured during training, every ``every`` calls of :meth:`step`.

    Each measurement runs on the fixed probe set ``data`` (batches that must be the same at every
    measurement, as for every curvkit operator) with the model in eval mode, on its current
    weights: the operators are built once and follow the live parameters (updated in place, as
    optimizers and ``load_state_dict`` do; a replaced ``Parameter`` or a ``model.to()`` to another
    dtype or device raises ModelError: build a new monitor). Quantities, by name:

    - ``"sharpness"``: the top-``k`` eigenvalues of the Hessian (``curvature="ggn"``: the GGN),
      warm-started from the previous measurement's vectors plus ``explore`` random columns (which
      guard against a new direction overtaking the old top); threshold ``2/lr`` for gradient
      descent, ``(2 + 2 beta)/lr`` with momentum (:func:`sgd_threshold`: dampening, Nesterov).
    - ``"preconditioned_sharpness"``: the top eigenvalues of ``P^-1/2 H P^-1/2`` (those of
      ``P^-1 H``), ``P`` read from ``optimizer``'s state (:func:`preconditioner`: Adam/AdamW,
      AdaHessian, Sophia, SGD); threshold ``2 (1 + beta1) / ((1 - beta1) lr)`` for the Adam
      kinds (38/lr at beta1 = 0.9).
    - ``"trace"``: Hutch++ with ``trace_probes`` products, with its standard error.
    - ``"grad_overlap"``: the fraction of the gradient in the top-``k`` eigenspace
      (:func:`curvkit.grad_overlap`); ``gradient="batch"`` the mini-batch gradient of the batch
      given to :meth:`step` (or the ``.grad`` the training step left), ``"probe"`` the probe
      set's, ``"auto"`` the first available of those. ``info["grad_overlap_source"]`` says which.
    - ``"outliers"``: :func:`curvkit.outliers` (top-``outlier_k`` and an SLQ bulk edge).
    - ``"layer_sharpness"``: the top eigenvalue of each layer's diagonal block, warm-started.
    - ``"batch_sharpness"``: the top eigenvalue of the Hessian of the batch given to
      :meth:`step`; ``info["batch_over_full"]`` its ratio to the full one (with ``"sharpness"``).

    Args:
        model, loss_fn, data, params, mode, output, max_batch: as for :func:`curvkit.hessian`
            (``mode="train"`` is refused for a model with active dropout).
        every: measure at calls ``0, every, 2 every, ...`` of :meth:`step` (a positive integer).
        quantities: names from the list above.
        optimizer: the optimizer training the model: its learning rate gives the thresholds,
            its state the preconditioner. Without it ``lr`` gives the gradient-descent thresholds.
        budget: the largest fraction of the training wall-clock the curvature work may take
            (e.g. 0.1): the monitor times the training between :meth:`step` calls and its own
            measurements, and stretches ``every`` (never below the one asked for) when a
            measurement would exceed it, with one :class:`BudgetWarning`; ``Record.every``
            records the period in force.
        raise_on_nonfinite: raise :class:`~curvkit.errors.NonFiniteError` on NaN/inf weights or
            curvature instead of recording a ``nonfinite`` record and carrying on.
        raise_on_error: False: any other failure of a measurement (a changed probe set, a
            failed product, out of memory) is recorded instead (``Record.message``,
            ``info["failed"]``, the values measured before it) with one warning, and training
            goes on; the framework callbacks pass False. True (default): it raises.
        progress: a progress line (``None``: only when stderr is a terminal).

    Cost per measurement: the sharpness, a few block products of ``k + explore`` columns (warm:
    typically 1-2 once training is steady; each block product is one pass over ``data``); the
    preconditioned sharpness the same; the trace ``trace_probes`` products; the outliers a warm
    top-``outlier_k`` plus ``density_iterations * density_probes`` products; per-layer, a warm
    top-1 per layer; the batch sharpness a warm top-1 on the batch; plus one forward pass over
    ``data`` for the loss, and one gradient pass for ``grad_overlap`` with the probe gradient.
    Memory: the warm-start vectors, ``k`` (and ``outlier_k``) vectors of the parameters' size.

    Example:
        >>> import torch, curvkit as ck
        >>> from curvkit.monitor import CurvatureMonitor
        >>> _ = torch.manual_seed(0); model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> mon = CurvatureMonitor(model, torch.nn.CrossEntropyLoss(), (x, y), every=5, optimizer=opt)
        >>> for _ in range(10):
        ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
        ...     _ = mon.step()
        >>> [r.step for r in mon.history], mon.history[0].thresholds["sharpness"]
        ([0, 5], 4.0)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        every: int = 50,
        *,
        quantities: tuple[str, ...] | list[str] = ("sharpness",),
        k: int = 1,
        curvature: Literal["hessian", "ggn"] = "hessian",
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        tol: float = 1e-3,
        max_matvecs: int | None = None,
        explore: int = 1,
        budget: float | None = None,
        trace_probes: int = 30,
        outlier_k: int = 20,
        density_iterations: int = 40,
        density_probes: int = 4,
        gradient: Gradient = "auto",
        params: Any = None,
        mode: Literal["eval", "train"] = "eval",
        output: Any = None,
        max_batch: int | None = None,
        seed: int | torch.Generator | None = 0,
        raise_on_nonfinite: bool = False,
        raise_on_error: bool = True,
        progress: bool | None = None,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ArgumentError(f"every must be a positive integer (measure every that many steps), got {every!r}")
        if isinstance(quantities, str):
            quantities = (quantities,)
        unknown = [q for q in quantities if q not in QUANTITIES]
        if unknown or not quantities:
            raise ArgumentError(f"unknown quantities {unknown or quantities!r}; choose from {', '.join(QUANTITIES)}")
        if curvature not in ("hessian", "ggn"):
            raise ArgumentError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        for name, v in (("k", k), ("outlier_k", outlier_k), ("trace_probes", trace_probes),
                        ("density_iterations", density_iterations), ("density_probes", density_probes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArgumentError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(explore, int) or explore < 0:
            raise ArgumentError(f"explore must be an integer >= 0 (random columns added to the warm start), got {explore!r}")
        if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget < 1):
            raise ArgumentError(f"budget must be a fraction of the training time in (0, 1), e.g. 0.1, or None; got {budget!r}")
        if gradient not in ("auto", "batch", "probe"):
            raise ArgumentError(f"gradient must be 'auto', 'batch' or 'probe', got {gradient!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ArgumentError(f"lr must be a positive number or None, got {lr!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.quantities = tuple(dict.fromkeys(quantities))
        self.model, self.loss_fn, self.curvature = model, loss_fn, curvature
        self.k, self.tol, self.max_matvecs, self.explore = k, float(tol), max_matvecs, explore
        self.optimizer, self.lr, self.budget = optimizer, lr, budget
        self.trace_probes, self.outlier_k = trace_probes, outlier_k
        self.density_iterations, self.density_probes = density_iterations, density_probes
        self.gradient, self.raise_on_nonfinite, self.progress = gradient, raise_on_nonfinite, progress
        self.raise_on_error = bool(raise_on_error)
        self.params, self.mode, self.output, self.max_batch = params, mode, output, max_batch
        self.seed = seed_int(seed)
        build = ggn if curvature == "ggn" else hessian
        # built once: the operator multiplies with the live parameters at every product
        self.operator = build(model, loss_fn, data, params, mode=mode, output=output, max_batch=max_batch)
        self._layers = self.operator.blocks("layer") if "layer_sharpness" in self.quantities else None
        if "preconditioned_sharpness" in self.quantities and optimizer is None:
            raise ArgumentError("preconditioned_sharpness reads the optimizer's state: pass optimizer=")
        if optimizer is not None and "preconditioned_sharpness" in self.quantities:
            self._check_optimizer()
        self.every = every          # the period asked for
        self.period = every         # the period in force (stretched by the budget)
        self.history: list[Record] = []
        self._calls = 0             # step() calls so far
        self._next = 0              # the call index of the next measurement
        self._warm: dict[str, Tensor] = {}
        self._train_seconds, self._train_intervals, self._curv_seconds = 0.0, 0, 0.0
        self._last_end: float | None = None
        self._warned = False
        self._warned_error = False
        self._bar = None

    # ------------------------------------------------------------------------------------
    def _check_optimizer(self) -> None:
        """Unsupported optimizers are refused at construction, not at the first measurement."""
        from ..optim import AdaHessian, Sophia
        from .preconditioner import SUPPORTED

        ok = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, AdaHessian, Sophia)
        if not isinstance(self.optimizer, ok):
            raise ArgumentError(f"the preconditioned sharpness does not know {type(self.optimizer).__name__}; it "
                                f"reads the state of {', '.join(SUPPORTED)}. Drop 'preconditioned_sharpness' from "
                                "quantities for others")

    def _current_lr(self) -> float | None:
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return self.lr

    def _gd_threshold(self) -> float | None:
        lr = self._current_lr()
        if lr is None:
            return None
        if self.optimizer is None:
            return sgd_threshold(lr)
        if isinstance(self.optimizer, torch.optim.SGD):
            return _sgd_group_threshold(lr, self.optimizer.param_groups[0])
        return None  # an adaptive optimizer: its threshold is the preconditioned one's

    # ------------------------------------------------------------------------------------
    def step(self, batch: Any = None) -> Record | None:
        """Call once per training step (after ``optimizer.step()``); measures when due.

        ``batch``: the step's ``(inputs, targets)`` mini-batch, for ``batch_sharpness`` and the
        mini-batch gradient of ``grad_overlap``. Returns the new :class:`Record`, or None when
        no measurement was due. Free when none is due (a clock read).
        """
        now = time.perf_counter()
        if self._last_end is not None:
            self._train_seconds += now - self._last_end
            self._train_intervals += 1
        rec = None
        if self._calls >= self._next:
            rec = self._measure(self._calls, batch)
            self._next = self._calls + self.period
        self._calls += 1
        self._last_end = time.perf_counter()
        return rec

    def measure(self, batch: Any = None, step: int | None = None) -> Record:
        """Measure now, whatever the schedule (``step`` labels the record; default: the number
        of :meth:`step` calls so far). Cost: see the class."""
        t0 = time.perf_counter()
        rec = self._measure(self._calls if step is None else step, batch)
        if self._last_end is not None:  # time spent here is not training time
            self._last_end += time.perf_counter() - t0
        return rec

    def _measure(self, step: int, batch: Any) -> Record:
        t_start = time.perf_counter()
        rec = Record(step=step, lr=self._current_lr(), every=self.period)
        try:
            self._run(rec, batch)
        except NonFiniteError as e:
            if self.raise_on_nonfinite:
                raise
            rec.nonfinite, rec.message = True, str(e)
        except Exception as e:  # noqa: BLE001 (raise_on_error=False: training must go on)
            if self.raise_on_error:
                raise
            rec.message, rec.info["failed"] = f"{type(e).__name__}: {e}", True
            if not self._warned_error:
                warnings.warn(f"a curvature measurement at step {step} failed and was recorded "
                              f"(Record.message); training goes on: {rec.message}", CurvkitWarning, stacklevel=4)
                self._warned_error = True
        spent = time.perf_counter() - t_start
        self._curv_seconds += spent
        rec.seconds["total"] = spent
        total = self._curv_seconds + self._train_seconds
        rec.budget_fraction = self._curv_seconds / total if total > 0 else None
        self._stretch(spent)
        rec.every = self.period  # the period until the next measurement
        if self.period > self.every:
            rec.info["budget_stretched"] = True
        self.history.append(rec)
        self._show(rec)
        return rec

    def _stretch(self, spent: float) -> None:
        """Lengthen the period so that one measurement of this cost stays within the budget."""
        if self.budget is None or self._train_intervals == 0:
            return
        per_step = self._train_seconds / self._train_intervals
        if per_step <= 0:
            return
        b = self.budget
        needed = math.ceil(spent * (1 - b) / (b * per_step))
        new = max(self.every, needed)
        if new > self.period and not self._warned:
            warnings.warn(
                f"curvature measurements take {spent:.3g} s against {per_step:.3g} s per training step: every is "
                f"stretched from {self.every} to {new} to keep them within budget={b:g} of the training time "
                "(Record.every records the period in force)", BudgetWarning, stacklevel=4)
            self._warned = True
        self.period = new

    def _show(self, rec: Record) -> None:
        if self._bar is None:
            self._bar = progress_bar(total=None, desc="curvature", enabled=self.progress, unit="measurement")
        self._bar.update(1)
        top = rec.top("sharpness")
        if top is not None:
            self._bar.set_postfix(step=rec.step, sharpness=f"{top:.4g}", refresh=False)

    def close(self) -> None:
        """Close the progress line (if one is shown)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------------
    def _seed(self, i: int) -> int:
        return (self.seed + 7919 * len(self.history) + i) % 2**62

    def _top(self, A: Any, key: str, k: int) -> Any:
        """Top-k eigenpairs of ``A``, warm-started from the last vectors under ``key``."""
        n = A.shape[0]
        prev = self._warm.get(key)
        k = min(k, n - 1)  # a block smaller than k (a layer): all but one of its eigenvalues, densely
        if prev is not None and prev.shape == (n, k):
            r = eigenvalues(A, k=k, tol=self.tol, max_matvecs=self.max_matvecs, seed=self._seed(1),
                            init=prev, block_size=k + self.explore, progress=False)
        else:
            r = eigenvalues(A, k=k, tol=self.tol, max_matvecs=self.max_matvecs, seed=self._seed(2), progress=False)
        if not bool(torch.isfinite(r.values).all()):
            raise NonFiniteError(f"{key}: the eigenvalues are NaN/inf; the curvature is not finite at these weights")
        self._warm[key] = r.vectors.detach().clone()
        return r

    def _run(self, rec: Record, batch: Any) -> None:
        H, q = self.operator, self.quantities
        live = dict(self.model.named_parameters())
        for name, p in H.space.named:
            if live.get(name) is not p or p.dtype != H.space.dtype or p.device != H.space.device:
                # a replaced Parameter (or a model.to() to another dtype/device) would be measured stale
                raise ModelError(f"parameter {name!r} was replaced or moved to another dtype/device since the "
                                 "monitor was built; build a new CurvatureMonitor for the model as it is now "
                                 "(load_state_dict carries the history over)")
        for name, p in H.space.named:
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"parameter {name!r} holds NaN/inf at step {rec.step}: training diverged")
        t0 = time.perf_counter()
        rec.loss = self._probe_loss()
        rec.seconds["loss"] = time.perf_counter() - t0
        gd = self._gd_threshold()
        eig = None

        def timed(name: str):
            return _Timer(rec, name)

        if "sharpness" in q or "grad_overlap" in q:
            with timed("sharpness"):
                eig = self._top(H, "sharpness", self.k)
                self._eig_record(rec, "sharpness", eig, gd)
        if "preconditioned_sharpness" in q:
            with timed("preconditioned_sharpness"):
                P = preconditioner(self.optimizer, H.space.tensors)
                A = H if P.diagonal is None else _congruence(H, P.diagonal)
                r = self._top(A, "preconditioned_sharpness", self.k)
                self._eig_record(rec, "preconditioned_sharpness", r, P.threshold)
                rec.info["preconditioner"] = P.kind
        if "trace" in q:
            with timed("trace"):
                tr = trace(H, probes=self.trace_probes, seed=self._seed(3))
                if not math.isfinite(tr.value):
                    raise NonFiniteError("the trace is NaN/inf: the curvature is not finite at these weights")
                rec.values["trace"], rec.errors["trace"], rec.products["trace"] = tr.value, tr.stderr, tr.matvecs
        if "grad_overlap" in q:
            with timed("grad_overlap"):
                g, source = self._gradient(batch)
                rec.values["grad_overlap"] = grad_overlap(eig, g)
                rec.info["grad_overlap_source"] = source
                rec.info["gradient_norm"] = float(g.norm())
                rec.products.setdefault("grad_overlap", 0)
        if "outliers" in q:
            with timed("outliers"):
                e = self._top(H, "outliers", self.outlier_k)
                o = outliers(H, eigen=e, density=True, iterations=self.density_iterations,
                             probes=self.density_probes, seed=self._seed(4), progress=False)
                rec.values["outliers"] = o.count
                rec.products["outliers"] = e.matvecs + o.matvecs
                rec.info["outliers"] = {"values": [float(v) for v in o.values], "bulk_edge": o.bulk_edge,
                                        "gap_ratio": o.gap_ratio, "capped_at_k": o.capped_at_k,
                                        "top": [float(v) for v in e.values]}
                rec.converged["outliers"] = bool(e.converged)
        if "layer_sharpness" in q:
            with timed("layer_sharpness"):
                vals, errs, prods = {}, {}, 0
                for name, B in self._layers.items():
                    if B.shape[0] == 1:
                        d = float((B @ torch.ones(1, dtype=B.dtype, device=B.device))[0])
                        vals[name], errs[name], prods = d, 0.0, prods + 1
                        continue
                    r = self._top(B, f"layer:{name}", 1)
                    vals[name], errs[name], prods = float(r.values[0]), float(r.residuals[0]), prods + r.matvecs
                rec.values["layer_sharpness"], rec.errors["layer_sharpness"] = vals, errs
                rec.products["layer_sharpness"] = prods
                rec.thresholds["layer_sharpness"] = gd
        if "batch_sharpness" in q:
            with timed("batch_sharpness"):
                if batch is None:
                    raise ArgumentError("batch_sharpness needs the step's mini-batch: call mon.step(batch=(x, y))")
                build = ggn if self.curvature == "ggn" else hessian
                Hb = build(self.model, self.loss_fn, batch, self.params, mode=self.mode, output=self.output,
                           max_batch=self.max_batch)
                r = self._top(Hb, "batch_sharpness", 1)
                rec.values["batch_sharpness"], rec.errors["batch_sharpness"] = float(r.values[0]), float(r.residuals[0])
                rec.products["batch_sharpness"] = r.matvecs
                rec.thresholds["batch_sharpness"] = gd
                rec.converged["batch_sharpness"] = bool(r.converged)
                full = rec.top("sharpness")
                if full:
                    rec.info["batch_over_full"] = float(r.values[0]) / full
        if "sharpness" not in q:  # computed for grad_overlap only: not a recorded quantity
            for d in (rec.values, rec.errors, rec.thresholds, rec.converged):
                d.pop("sharpness", None)

    def _eig_record(self, rec: Record, name: str, r: Any, threshold: float | None) -> None:
        rec.values[name] = [float(v) for v in r.values]
        rec.errors[name] = [float(v) for v in r.residuals]
        rec.products[name] = int(r.matvecs)
        rec.info[f"{name}_block_products"] = int(r.iterations)
        rec.converged[name] = bool(r.converged)
        rec.thresholds[name] = threshold

    def _probe_loss(self) -> float:
        """The loss over the probe set (one forward pass, no gradient)."""
        risk = self.operator.risk
        f = risk.function()

        def batch(x: Any, y: Tensor, _: int):
            with torch.no_grad():
                out = f(risk.space.detached(), x)
                return [], risk.loss(out, y), risk.weight(out, y)

        with risk.in_mode():
            return float(risk.accumulate(batch, what="probe loss").loss)

    def _gradient(self, batch: Any) -> tuple[Tensor, str]:
        H = self.operator
        if self.gradient in ("auto", "batch"):
            if batch is not None:
                r = Risk(self.model, self.loss_fn, batch, space=H.space, spec=H.risk.spec, mode=self.mode,
                         output=self.output, max_batch=self.max_batch, distributed=H.risk.group is not None)
                with r.in_mode():
                    return r.loss_and_gradient()[1], "batch"
            grads = [p.grad for p in H.space.tensors]
            if all(g is not None for g in grads):
                return H.space.flatten([g.detach() for g in grads]), "batch (.grad)"
            if self.gradient == "batch":
                raise ArgumentError("gradient='batch' needs the step's batch (mon.step(batch=(x, y))) or the .grad "
                                    "of a backward pass; none was there. Use gradient='probe' for the probe set's")
        return H.loss_and_gradient()[1], "probe"

    # ------------------------------------------------------------------------------------
    def to_jsonl(self, path: str | Path) -> Path:
        """Write the history, one JSON record per line. Free."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for r in self.history:
                fh.write(json.dumps(_jsonable(r.to_dict())) + "\n")
        return path

    def plot(self, path: str | Path) -> Path:
        """Draw every recorded quantity against the step, thresholds as dashed lines (matplotlib)."""
        from .plot import plot_history

        return plot_history(self.history, path)

    def state_dict(self) -> dict:
        """What resumes the monitor from a checkpoint: the history, the schedule, the clocks and
        the warm-start vectors (on the CPU)."""
        return {
            "history": [r.to_dict() for r in self.history], "calls": self._calls, "next": self._next,
            "period": self.period, "warm": {k: v.cpu() for k, v in self._warm.items()},
            "train_seconds": self._train_seconds, "train_intervals": self._train_intervals,
            "curv_seconds": self._curv_seconds, "warned": self._warned, "quantities": list(self.quantities),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the same model, data and quantities)."""
        try:
            self.history = [Record(**r) for r in state["history"]]
            self._calls, self._next, self.period = int(state["calls"]), int(state["next"]), int(state["period"])
            dev = self.operator.device
            self._warm = {k: v.to(device=dev, dtype=torch.promote_types(v.dtype, self.operator.dtype))
                          for k, v in state["warm"].items()}
            self._train_seconds, self._train_intervals = float(state["train_seconds"]), int(state["train_intervals"])
            self._curv_seconds, self._warned = float(state["curv_seconds"]), bool(state["warned"])
        except (KeyError, TypeError) as e:
            raise ArgumentError(f"not a CurvatureMonitor state_dict ({e}); pass what mon.state_dict() returned") from e
        self._warm = {k: v for k, v in self._warm.items() if v.shape[0] == self.operator.shape[0] or k.startswith("layer:")}
        self._last_end = None


class _Timer:
    def __init__(self, rec: Record, name: str):
        self.rec, self.name = rec, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.rec.seconds[self.name] = time.perf_counter() - self.t0
        return False


def _congruence(H: Any, p: Tensor) -> Any:
    """``P^-1/2 H P^-1/2`` for a positive diagonal ``p``: symmetric, with the eigenvalues of ``P^-1 H``."""
    D = DiagonalOperator(p.to(device=H.device, dtype=H.dtype).rsqrt())
    return D @ H @ D


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


__all__ = ["CurvatureMonitor", "Record", "BudgetWarning", "QUANTITIES"]
