"""A Lightning callback over :class:`curvkit.monitor.CurvatureMonitor` (``pip install 'curvkit[lightning]'``).

Example (needs ``lightning``)::

    from curvkit.integrations.lightning import CurvatureCallback
    cb = CurvatureCallback(probe, torch.nn.CrossEntropyLoss(), every=100, jsonl="curv.jsonl", plot="curv.png")
    lightning.Trainer(callbacks=[cb]).fit(module, loader)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model.data import map_tensors
from .metrics import FrameworkMissing, finish, record_metrics

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise FrameworkMissing("curvkit.integrations.lightning needs Lightning: pip install 'curvkit[lightning]'") from e


class CurvatureCallback(Callback):
    """Measures curvature every ``every`` training batches and logs it with
    ``trainer.lightning_module.log_dict`` (metrics of :func:`~curvkit.integrations.metrics.record_metrics`).

    The monitor is built at the start of fitting on the LightningModule (the model; its forward
    must give what ``loss_fn`` takes), its first optimizer and ``data`` moved to the module's
    device; then ``on_train_batch_end`` calls ``monitor.step(batch=...)`` (the batch is passed when
    a quantity needs it). At the end of training the history goes to ``jsonl`` and ``plot`` (if
    given). The callback's ``state_dict`` carries the monitor's, so a resumed run resumes it.
    A measurement that fails is recorded (``Record.message``) with one warning and training goes
    on (``raise_on_nonfinite=True`` still raises on NaN/inf). Under DDP every rank measures (the
    products all-reduce) and only global rank zero writes ``jsonl`` and ``plot``.

    Args:
        data: the fixed probe set: an ``(inputs, targets)`` batch or a list of them.
        loss_fn: ``loss_fn(module(inputs), targets)``, as for :func:`curvkit.hessian`.
        every, quantities, k, curvature, budget, tol, seed, raise_on_nonfinite: as for
            :class:`~curvkit.monitor.CurvatureMonitor`.
        monitor_options: any other keyword arguments of the monitor (``params``, ``output``, ...).
        prefix: the metrics' name prefix.

    Cost: the monitor's, per measurement; nothing on other batches.
    """

    def __init__(self, data: Any, loss_fn: Any, every: int = 50, *, quantities: tuple[str, ...] = ("sharpness",),
                 k: int = 1, curvature: str = "hessian", budget: float | None = None, tol: float = 1e-3,
                 seed: int = 0, raise_on_nonfinite: bool = False, jsonl: str | Path | None = None,
                 plot: str | Path | None = None, prefix: str = "curvature/", monitor_options: dict | None = None):
        super().__init__()
        from ..monitor import CurvatureMonitor  # validated now, before a long fit starts
        from ..errors import ArgumentError

        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ArgumentError(f"every must be a positive integer (measure every that many steps), got {every!r}")
        self.data, self.loss_fn, self.jsonl, self.plot_path, self.prefix = data, loss_fn, jsonl, plot, prefix
        self.options = {**dict(every=every, quantities=tuple(quantities), k=k, curvature=curvature, budget=budget,
                               tol=tol, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                               raise_on_error=False),  # a failed measurement is recorded, training goes on
                        **(monitor_options or {})}
        self._cls = CurvatureMonitor
        self.monitor = None
        self._pending_state: dict | None = None
        self._needs_batch = "batch_sharpness" in quantities or (
            "grad_overlap" in quantities and self.options.get("gradient", "auto") != "probe")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            return
        dev = pl_module.device
        data = map_tensors(lambda t: t.to(dev), self.data)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = self._cls(pl_module, self.loss_fn, data, optimizer=opt, **self.options)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rec = self.monitor.step(batch=tuple(batch) if self._needs_batch else None)
        if rec is not None:
            trainer.lightning_module.log_dict(record_metrics(rec, self.prefix), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        finish(self.monitor, getattr(trainer, "is_global_zero", True), self.jsonl, self.plot_path)

    @property
    def history(self) -> list:
        return self.monitor.history if self.monitor is not None else []

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()} if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "monitor" in state_dict:
            if self.monitor is not None:
                self.monitor.load_state_dict(state_dict["monitor"])
            else:
                self._pending_state = state_dict["monitor"]
