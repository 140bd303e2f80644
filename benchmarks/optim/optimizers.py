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
import os
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class OptSpec:
    name: str
    lrs: list[float]            # the sweep, roughly x3 apart: 5 values where the first CPU run put
                                #   the best rate at the top of a 4-value grid, 4 for the AdaHessians,
                                #   7 for K-FAC (best at 3e-4 on the LM, 3e-2 on MNIST)
    factory: Callable           # (model, lr, refresh, seed) -> optimizer
    style: str                  # "torch" | "curvkit" | "create_graph"
    needs_likelihood: bool = False   # Sophia-GNB: classification / LM only
    schedule_free: bool = False      # needs opt.train() / opt.eval() around evaluation
    refreshes: tuple = ()            # refresh periods timed in isolation (curvature / preconditioner)
    default_refresh: int | None = None
    not_for: dict = field(default_factory=dict)   # workload -> why the optimizer does not apply
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

    def make(self, model, lr: float, refresh: int | None = None, seed: int = 0):
        return self.factory(model, lr, refresh if refresh is not None else self.default_refresh, seed)


def _ck(name: str, **kw):
    def f(model, lr, refresh, seed):
        mod = importlib.import_module("curvkit.optim")
        return getattr(mod, name)(model.parameters(), lr=lr, every=refresh, seed=seed, weight_decay=0.0, **kw)

    return f


def _po(name: str):
    def f(model, lr, refresh, seed):
        cls = getattr(importlib.import_module("pytorch_optimizer"), name)
        return cls(model.parameters(), lr=lr, update_period=refresh, weight_decay=0.0)

    return f


def _torch(cls, **kw):
    def f(model, lr, refresh, seed):
        return cls(model.parameters(), lr=lr, **kw)

    return f


# --- Kronecker and orthogonalising optimizers (issue 7) ---------------------------------------
MUON_ADAMW_LR = 1e-2  # the AdamW part of every Muon row: AdamW's best rate on all three CPU workloads


def muon_split(model):
    """(matrices, others): the parameters Muon orthogonalises and those AdamW takes, by curvkit's
    rule, so every Muon row (curvkit's and the peers') splits the model the same way."""
    from curvkit.optim.muon import split_model

    groups = split_model(model)
    return ([p for g in groups if g["use_muon"] for p in g["params"]],
            [p for g in groups if not g["use_muon"] for p in g["params"]])


def _ck_kfac(model, lr, refresh, seed):
    from curvkit.optim import KFAC

    return KFAC(model, lr=lr, inverse_every=refresh, weight_decay=0.0)


def _ck_shampoo(model, lr, refresh, seed):
    from curvkit.optim import Shampoo

    return Shampoo(model.parameters(), lr=lr, every=refresh, weight_decay=0.0)


def _ck_soap(model, lr, refresh, seed):
    from curvkit.optim import SOAP

    return SOAP(model.parameters(), lr=lr, every=refresh, weight_decay=0.0)


def _ck_muon(model, lr, refresh, seed):
    from curvkit.optim import Muon

    return Muon(model, lr=lr, adamw_lr=MUON_ADAMW_LR, weight_decay=0.0)


def _ck_mfac(model, lr, refresh, seed):
    from curvkit.optim import MFAC

    return MFAC(model.parameters(), lr=lr, window=32, damping=1e-2, weight_decay=0.0)


def _heavyball():
    """heavyball, with its torch.compile mode from ``CURVKIT_BENCH_HEAVYBALL_COMPILE`` if set
    ("none": eager; else a torch.compile mode). Its default, "max-autotune-no-cudagraphs",
    autotunes every matrix shape of every optimizer instance: on the H100 the first workload's
    warm-up had not finished after 8 minutes, so GPU runs state the mode they used."""
    import heavyball

    mode = os.environ.get("CURVKIT_BENCH_HEAVYBALL_COMPILE")
    if mode is not None:
        heavyball.utils.compile_mode = None if mode == "none" else mode
    return heavyball


def heavyball_mode() -> str | None:
    """The compile mode heavyball rows run with (None if heavyball is not importable)."""
    try:
        return str(_heavyball().utils.compile_mode)
    except ImportError:
        return None


def _hb(name: str, **kw):
    def f(model, lr, refresh, seed):
        heavyball = _heavyball()

        extra = {"precondition_frequency": refresh} if name == "SOAP" else {}
        return getattr(heavyball, name)(model.parameters(), lr=lr, weight_decay=0.0, **extra, **kw)

    return f


def _hb_muon(model, lr, refresh, seed):
    heavyball = _heavyball()

    mats, rest = muon_split(model)
    return heavyball.SplitOpt([
        {"params": mats, "optimizer": heavyball.Muon, "lr": lr, "weight_decay": 0.0},
        {"params": rest, "optimizer": heavyball.AdamW, "lr": MUON_ADAMW_LR, "weight_decay": 0.0},
    ])


def _po_muon(model, lr, refresh, seed):
    from pytorch_optimizer import Muon

    mats, rest = muon_split(model)
    return Muon([dict(params=mats, use_muon=True), dict(params=rest, use_muon=False)], lr=lr,
                adamw_lr=MUON_ADAMW_LR, weight_decay=0.0, adamw_wd=0.0)


def _po_shampoo(model, lr, refresh, seed):
    from pytorch_optimizer import Shampoo

    return Shampoo(model.parameters(), lr=lr, preconditioning_compute_steps=refresh, weight_decay=0.0)


def _po_scalable_shampoo(model, lr, refresh, seed):
    """pytorch-optimizer's ScalableShampoo at curvkit Shampoo's settings: EMA factors (beta2
    0.999), momentum 0.9, blocks of 1024, roots every ``refresh`` steps from step ``refresh``,
    grafted to RMSProp's norm (its closest to Adam grafting)."""
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    return ScalableShampoo(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0,
                           start_preconditioning_step=refresh, preconditioning_compute_steps=refresh,
                           block_size=1024, graft_type=LayerWiseGrafting.RMSPROP, nesterov=False)


def _lion(model, lr, refresh, seed):
    try:
        from lion_pytorch import Lion  # lucidrains' reference implementation
    except ImportError:
        from pytorch_optimizer import Lion
    return Lion(model.parameters(), lr=lr, weight_decay=0.0)


def _sf(model, lr, refresh, seed):
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(model.parameters(), lr=lr, weight_decay=0.0)


_KFAC_PINN = ("its factors come from the hooks of an ordinary forward and backward pass; the PINN's loss "
              "is built from the network's input derivatives (ck.laplacian's Taylor-mode pass), which K-FAC "
              "refuses with a LossError (K-FAC for PDE losses needs Taylor-mode factors, Dangel et al. 2024)")


SPECS: dict[str, OptSpec] = {s.name: s for s in [
    OptSpec("adamw", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            _torch(torch.optim.AdamW, weight_decay=0.0), "torch"),
    OptSpec("sgd", [1e-2, 3e-2, 1e-1, 3e-1, 1.0],
            _torch(torch.optim.SGD, momentum=0.9), "torch", note="momentum 0.9"),
    OptSpec("adahessian", [1e-2, 3e-2, 1e-1, 3e-1], _ck("AdaHessian"), "curvkit",
            refreshes=(1, 10), default_refresh=1, package="curvkit.optim", note="curvkit"),
    OptSpec("sophia_h", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], _ck("Sophia", estimator="hutchinson"), "curvkit",
            refreshes=(1, 10), default_refresh=10, package="curvkit.optim", note="curvkit, Hutchinson"),
    OptSpec("sophia_gnb", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], _ck("Sophia", estimator="gnb"), "curvkit",
            needs_likelihood=True, refreshes=(1, 10), default_refresh=10, package="curvkit.optim",
            note="curvkit, Gauss-Newton-Bartlett"),
    OptSpec("lion", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], _lion, "torch", package="lion_pytorch", note="lion-pytorch"),
    OptSpec("sf_adamw", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], _sf, "torch", schedule_free=True, package="schedulefree",
            note="schedulefree.AdamWScheduleFree"),
    OptSpec("po_adahessian", [1e-2, 3e-2, 1e-1, 3e-1], _po("AdaHessian"), "create_graph",
            refreshes=(1, 10), default_refresh=1, package="pytorch_optimizer", note="pytorch-optimizer (peer)"),
    OptSpec("po_sophiah", [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], _po("SophiaH"), "create_graph",
            refreshes=(1, 10), default_refresh=10, package="pytorch_optimizer", note="pytorch-optimizer (peer)"),
    # issue 7: Kronecker-factored and orthogonalising optimizers, preconditioners refreshed every 10
    OptSpec("kfac", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], _ck_kfac, "torch", refreshes=(10,), default_refresh=10,
            package="curvkit.optim", note="curvkit", not_for={"pinn_poisson": _KFAC_PINN}),
    OptSpec("shampoo", [3e-4, 1e-3, 3e-3, 1e-2], _ck_shampoo, "torch", refreshes=(10,), default_refresh=10,
            package="curvkit.optim", note="curvkit, grafted to Adam"),
    OptSpec("soap", [1e-3, 3e-3, 1e-2, 3e-2], _ck_soap, "torch", refreshes=(10,), default_refresh=10,
            package="curvkit.optim", note="curvkit"),
    OptSpec("muon", [3e-3, 1e-2, 3e-2, 1e-1], _ck_muon, "torch", package="curvkit.optim",
            note=f"curvkit; AdamW lr {MUON_ADAMW_LR:g} for embeddings, head, norms, biases"),
    # issue 15: M-FAC, the windowed empirical Fisher's inverse (32 gradients, damping 1e-2)
    OptSpec("mfac", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], _ck_mfac, "torch", package="curvkit.optim",
            note="curvkit, window 32, damping 1e-2"),
    OptSpec("hb_soap", [1e-3, 3e-3, 1e-2, 3e-2], _hb("SOAP"), "torch", refreshes=(10,), default_refresh=10,
            package="heavyball", note="heavyball (peer)"),
    OptSpec("hb_psgd_kron", [3e-4, 1e-3, 3e-3, 1e-2], _hb("PSGDKron"), "torch", package="heavyball",
            note="heavyball (peer)"),
    OptSpec("hb_muon", [3e-3, 1e-2, 3e-2, 1e-1], _hb_muon, "torch", package="heavyball",
            note="heavyball Muon + AdamW (SplitOpt), curvkit's split (peer)"),
    OptSpec("po_shampoo", [3e-4, 1e-3, 3e-3, 1e-2], _po_shampoo, "torch", refreshes=(10,), default_refresh=10,
            package="pytorch_optimizer", note="pytorch-optimizer (peer)"),
    OptSpec("po_scalable_shampoo", [3e-4, 1e-3, 3e-3, 1e-2], _po_scalable_shampoo, "torch", refreshes=(10,),
            default_refresh=10, package="pytorch_optimizer",
            note="pytorch-optimizer ScalableShampoo at curvkit Shampoo's settings (peer)"),
    OptSpec("po_muon", [3e-3, 1e-2, 3e-2, 1e-1], _po_muon, "torch", package="pytorch_optimizer",
            note="pytorch-optimizer, curvkit's split (peer)"),
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
