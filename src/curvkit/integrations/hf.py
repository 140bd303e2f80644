"""A Hugging Face ``Trainer`` callback over :class:`curvkit.monitor.CurvatureMonitor`
(``pip install 'curvkit[hf]'``).

Example (needs ``transformers``)::

    from curvkit.integrations.hf import CurvatureCallback
    probe = [({"input_ids": ids}, labels)]       # (model inputs as a dict, targets)
    cb = CurvatureCallback(probe, ck_loss, every=100, output="logits", jsonl="curv.jsonl", plot="curv.png")
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from ..model.data import map_tensors
from .metrics import FrameworkMissing, finish, record_metrics

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise FrameworkMissing("curvkit.integrations.hf needs transformers: pip install 'curvkit[hf]'") from e


class CurvatureCallback(TrainerCallback):
    """Measures curvature every ``every`` optimizer steps of the HF ``Trainer`` (``on_step_end``)
    and adds the metrics (:func:`~curvkit.integrations.metrics.record_metrics`) to the next
    ``on_log`` call's ``logs``, which the reporting callbacks after this one (and ``log_history``,
    where this callback appends them) see; ``jsonl`` and ``plot`` are written at the end.

    The monitor is built at the first step on the Trainer's model and optimizer, with ``data``
    (``(inputs, targets)`` pairs; dict inputs are passed as ``model(**inputs)``; pick the logits
    with ``output="logits"``) moved to the model's device. The Trainer zeroes the gradients before
    ``on_step_end`` and does not pass the batch, so ``batch_sharpness`` is refused and
    ``grad_overlap`` uses the probe set's gradient. A measurement that fails is recorded
    (``Record.message``) with one warning and training goes on (``raise_on_nonfinite=True``
    still raises on NaN/inf). Under DDP every process measures (the products all-reduce) and
    only the world process zero writes ``jsonl`` and ``plot``.

    Args:
        data, loss_fn, every, quantities, k, curvature, budget, tol, seed, raise_on_nonfinite,
        output: as for :class:`~curvkit.monitor.CurvatureMonitor`.
        monitor_options: any other keyword arguments of the monitor.

    Cost: the monitor's, per measurement.
    """

    def __init__(self, data: Any, loss_fn: Any, every: int = 50, *, quantities: tuple[str, ...] = ("sharpness",),
                 k: int = 1, curvature: str = "hessian", budget: float | None = None, tol: float = 1e-3,
                 seed: int = 0, raise_on_nonfinite: bool = False, output: Any = None,
                 jsonl: str | Path | None = None, plot: str | Path | None = None, prefix: str = "curvature/",
                 monitor_options: dict | None = None):
        from ..monitor import CurvatureMonitor

        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ArgumentError(f"every must be a positive integer (measure every that many steps), got {every!r}")
        if "batch_sharpness" in quantities:
            raise ArgumentError("the HF Trainer does not give callbacks the step's batch: drop 'batch_sharpness' "
                                "(or use CurvatureMonitor in your own loop)")
        self.data, self.loss_fn, self.jsonl, self.plot_path, self.prefix = data, loss_fn, jsonl, plot, prefix
        self.options = {**dict(every=every, quantities=tuple(quantities), k=k, curvature=curvature, budget=budget,
                               tol=tol, seed=seed, raise_on_nonfinite=raise_on_nonfinite, output=output,
                               raise_on_error=False,  # a failed measurement is recorded, training goes on
                               gradient="probe"), **(monitor_options or {})}
        self._cls = CurvatureMonitor
        self.monitor = None
        self._pending: dict[str, float] = {}

    def _build(self, model: Any, optimizer: Any) -> None:
        dev = next(model.parameters()).device
        data = map_tensors(lambda t: t.to(dev), self.data)
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.monitor = self._cls(model, self.loss_fn, data, optimizer=opt, **self.options)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.monitor is None:
            self._build(model, optimizer)
        rec = self.monitor.step()
        if rec is not None:
            rec.info["global_step"] = int(state.global_step)
            self._pending = record_metrics(rec, self.prefix)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        finish(self.monitor, getattr(state, "is_world_process_zero", True), self.jsonl, self.plot_path)

    @property
    def history(self) -> list:
        return self.monitor.history if self.monitor is not None else []
