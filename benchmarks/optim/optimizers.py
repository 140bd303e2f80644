"""The optimizers under test, their learning-rate grids, and one step adapter per calling style.

Three ways optimizers want to be driven, hidden behind :func:`make_stepper`:

* ``torch``: ``zero_grad(); loss.backward(); step()`` (AdamW, SGD, Lion, Schedule-Free AdamW);
* ``curvkit``: ``loss = opt.step(closure)``, the closure runs the forward pass and returns the
  loss (``(loss, logits)`` for Sophia's GNB estimator) WITHOUT calling backward; the optimizer
  differentiates it itself, with ``create_graph=True`` only on the steps that refresh the diagonal;
* ``create_graph``: ``loss.backward(create_graph=True); step()`` on every step, as
  pytorch-optimizer's AdaHessian and SophiaH require (they take the Hessian-vector product from
  ``p.grad`` inside ``step``).

Peers (``pytorch_optimizer``, ``schedulefree``, ``lion_pytorch``) live in curvkit's ``bench``
extra, never in its runtime dependencies; a row whose package is not importable is skipped
with a message. Weight decay is 0 for every optimizer (these budgets are too short for a
regularizer to matter, and it keeps the comparison about the update rule); everything else is
the package's default except the learning rate and the refresh period.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class OptSpec:
    name: str
    lrs: list[float]            # the sweep, roughly x3 apart: 5 values where the first CPU run put
                                #   the best rate at the top of a 4-value grid, 4 for the AdaHessians
    factory: Callable           # (params, lr, refresh, seed) -> optimizer
    style: str                  # "torch" | "curvkit" | "create_graph"
    needs_likelihood: bool = False   # Sophia-GNB: classification / LM only
    schedule_free: bool = False      # needs opt.train() / opt.eval() around evaluation
    hessian: bool = False            # has a curvature refresh period
    default_refresh: int | None = None
    package: str | None = None       # what must be importable
    note: str = ""

    def available(self) -> tuple[bool, str]:
        if self.package is None:
            return True, ""
        try:
            importlib.import_module(self.package)
        except ImportError as e:
            return False, f"{self.name}: {self.package} not importable ({e}); row skipped (pip install 'curvkit[bench]')"
        return True, ""

    def make(self, params, lr: float, refresh: int | None = None, seed: int = 0):
        return self.factory(params, lr, refresh if refresh is not None else self.default_refresh, seed)


def _ck(name: str, **kw):
    def f(params, lr, refresh, seed):
        mod = importlib.import_module("curvkit.optim")
        return getattr(mod, name)(params, lr=lr, update_each=refresh, seed=seed, weight_decay=0.0, **kw)

    return f


def _po(name: str):
    def f(params, lr, refresh, seed):
        cls = getattr(importlib.import_module("pytorch_optimizer"), name)
        return cls(params, lr=lr, update_period=refresh, weight_decay=0.0)

    return f


def _lion(params, lr, refresh, seed):
    try:
        from lion_pytorch import Lion  # lucidrains' reference implementation
    except ImportError:
        from pytorch_optimizer import Lion
    return Lion(params, lr=lr, weight_decay=0.0)


def _sf(params, lr, refresh, seed):
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params, lr=lr, weight_decay=0.0)


SPECS: dict[str, OptSpec] = {s.name: s for s in [
    OptSpec("adamw", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            lambda p, lr, r, s: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), "torch"),
    OptSpec("sgd", [1e-2, 3e-2, 1e-1, 3e-1, 1.0],
            lambda p, lr, r, s: torch.optim.SGD(p, lr=lr, momentum=0.9), "torch", note="momentum 0.9"),
    OptSpec("adahessian", [1e-2, 3e-2, 1e-1, 3e-1], _ck("AdaHessian"), "curvkit",
            hessian=True, default_refresh=1, package="curvkit.optim", note="curvkit"),
    OptSpec("sophia_h", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], _ck("Sophia", estimator="hutchinson"), "curvkit",
            hessian=True, default_refresh=10, package="curvkit.optim", note="curvkit, Hutchinson"),
    OptSpec("sophia_gnb", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], _ck("Sophia", estimator="gnb"), "curvkit",
            needs_likelihood=True, hessian=True, default_refresh=10, package="curvkit.optim",
            note="curvkit, Gauss-Newton-Bartlett"),
    OptSpec("lion", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], _lion, "torch", package="lion_pytorch", note="lion-pytorch"),
    OptSpec("sf_adamw", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], _sf, "torch", schedule_free=True, package="schedulefree",
            note="schedulefree.AdamWScheduleFree"),
    OptSpec("po_adahessian", [1e-2, 3e-2, 1e-1, 3e-1], _po("AdaHessian"), "create_graph",
            hessian=True, default_refresh=1, package="pytorch_optimizer", note="pytorch-optimizer (peer)"),
    OptSpec("po_sophiah", [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], _po("SophiaH"), "create_graph",
            hessian=True, default_refresh=10, package="pytorch_optimizer", note="pytorch-optimizer (peer)"),
]}


def make_stepper(spec: OptSpec, opt, task) -> Callable[[int], None]:
    """``step(i)``: one training step on the batch of step ``i``, in the optimizer's own style.

    Returns nothing and reads no number back, so GPU steps are not synchronised one by one.
    """
    if spec.style == "torch":
        def step(i: int) -> None:
            b = task.batch(i)
            opt.zero_grad(set_to_none=True)
            task.loss(b)[0].backward()
            opt.step()
    elif spec.style == "create_graph":
        def step(i: int) -> None:
            b = task.batch(i)
            opt.zero_grad(set_to_none=True)
            task.loss(b)[0].backward(create_graph=True)
            opt.step()
            opt.zero_grad(set_to_none=True)  # p.grad holds a graph: drop it (and the cycle) now
    elif spec.style == "curvkit":
        def step(i: int) -> None:
            b = task.batch(i)

            def closure():
                loss, logits = task.loss(b)
                return (loss, logits) if spec.needs_likelihood else loss

            opt.zero_grad(set_to_none=True)
            opt.step(closure)
    else:
        raise ValueError(f"unknown style {spec.style!r}")
    return step


def state_bytes(opt) -> int:
    """Bytes of the tensors in ``opt.state`` (the optimizer's own memory, device-independent)."""
    total = 0
    for st in opt.state.values():
        if isinstance(st, dict):
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total
