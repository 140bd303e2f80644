r"""K-FAC (Martens & Grosse 2015) as a ``torch.optim.Optimizer`` driven by the plain loop
``opt.zero_grad(); loss.backward(); opt.step()``.

The factors come from :mod:`curvkit.approx.kronecker`, the same core as ``ck.kfac``: with
``kind="empirical"`` on one batch of a model whose layers see one row per example and a
loss that averages over the examples, ``ck.kfac(...).inverse(damping)`` applied to the gradient
is exactly this optimizer's first preconditioned direction (``kl_clip=None``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..approx.kronecker import activation_factor, gradient_factor, input_rows, kron_eigen, kron_layers, kron_solve, output_rows
from ..errors import ModelError
from ..model import LayerHooks, resolve_params
from ._base import CurvkitOptimizer, all_finite, check_number, check_positive_int, raise_non_finite, state_dtype

_HINT = "Train that layer with another optimizer: pass KFAC(model, params=...) without its parameters"
_KEYS = ("kfac_A", "kfac_G")
_EIG = ("kfac_dA", "kfac_QA", "kfac_dG", "kfac_QG")


class KFAC(CurvkitOptimizer):
    r"""K-FAC: gradients of ``nn.Linear``/``nn.Conv2d`` layers preconditioned by
    ``(A (x) G + damping I)^{-1}``, then momentum and decoupled weight decay.

    On factor-update steps (every ``factor_update_each``) forward hooks keep each layer's
    input and tensor hooks on its output take the backward's gradient ``dL/ds``; the factors
    ``A = a~^T a~ / N`` and ``G = N (dL/ds)^T (dL/ds) / T`` (empirical Fisher of a loss that
    averages over the ``N`` examples of the batch; ``T`` conv positions per example) enter
    exponential moving averages with weight ``ema`` (the first update sets them). Every
    ``inverse_update_each`` steps both are eigendecomposed (``matfun.sym_eigh``) and the update
    direction of a layer with gradient ``M = [dW | db]`` is the exact damped solve
    ``Q_G [(Q_G^T M Q_A) / (d_G d_A^T + damping)] Q_A^T``. Then, for every parameter,
    ``buf = momentum * buf + direction`` and ``p = p (1 - lr weight_decay) - lr buf``.

    Parameters K-FAC cannot precondition (norms, embeddings, grouped convs, tied weights) get
    plain SGD with the same momentum and weight decay. Factors and all state are float32 for
    bf16/fp16 models (float64 stays float64). Under ``torch.distributed`` (world size > 1) the
    factor statistics are averaged over ranks before the EMA, so ranks stay identical. A NaN/inf
    gradient or factor raises ``NonFiniteError`` before any parameter or state is written. A
    layer called twice in one forward (weight sharing) raises ``ModelError``.

    Args: ``lr``, ``momentum``, ``weight_decay`` (decoupled) and ``damping`` are per param
    group; ``factor_update_each``/``inverse_update_each`` set the schedule (step 0 does both);
    ``ema`` weighs the old factors; ``kl_clip`` (default 1e-3, as in Ba et al. 2017 and the
    common K-FAC implementations; ``None`` turns it off) scales the preconditioned directions by
    ``min(1, sqrt(kl_clip / sum lr^2 <d, g>))`` so a step's predicted KL change stays bounded —
    without it K-FAC with small damping takes huge steps along directions of tiny curvature and
    diverges in a few steps; ``params`` (a ``ck`` parameter spec: names, a regex, a
    predicate, tensors) restricts what this optimizer trains. ``G`` assumes the loss averages
    over examples (as cross-entropy does); a loss that also averages over outputs (``MSELoss``
    over ``d`` outputs) gives ``G / d`` relative to ``ck.kfac(..., kind="empirical")``,
    layers applied at ``S`` positions per example (sequences) give ``G / S``, and a loss divided
    by ``k`` for gradient accumulation gives ``G / k^2``: each only rescales the effective
    damping (and the KL clip). Under fp16 ``GradScaler`` the hooks see scaled gradients, so ``G``
    carries the scale squared: use bf16 autocast, which needs no scaler. ``remove_hooks()`` detaches it from the model.

    Cost per step: the backward the user runs; on factor-update steps one ``(rows x cols)``
    Gram matrix for each factor of each layer (conv inputs unfolded) and activations kept
    until backward (other steps: the hooks store nothing); every ``inverse_update_each`` steps
    two ``eigh`` per layer; per step four small matrix products per layer.

    >>> import torch
    >>> from curvkit.optim import KFAC
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = KFAC(model, lr=0.1, damping=1e-2)
    >>> for i in range(30):
    ...     opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    ...     first = loss.item() if i == 0 else first
    >>> bool(loss.item() < first / 2)
    True
    >>> opt.remove_hooks()
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, factor_update_each: int = 1, inverse_update_each: int = 10,
                 ema: float = 0.95, kl_clip: float | None = 1e-3, params: Any = None):
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"KFAC needs the model itself (it hooks its layers), got {type(model).__name__}; "
                "use KFAC(model, lr=...) rather than KFAC(model.parameters(), ...)"
            )
        check_number("lr", lr)
        check_number("damping", damping, strict=True)
        check_number("momentum", momentum, high=1.0)
        check_number("weight_decay", weight_decay)
        check_number("ema", ema, high=1.0)
        check_positive_int("factor_update_each", factor_update_each)
        check_positive_int("inverse_update_each", inverse_update_each)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, strict=True)
        named = [(n, p) for n, p in resolve_params(model, params) if p.requires_grad]
        if not named:
            raise ModelError("none of the chosen parameters requires grad; nothing to train")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__([p for _, p in named], defaults)
        self.factor_update_each, self.inverse_update_each, self.ema = factor_update_each, inverse_update_each, ema
        self.kl_clip = kl_clip
        self.layers, left = kron_layers(model, named)
        by_name = dict(named)
        self._lparams = [[by_name[n] for n in layer.kron_params()] for layer in self.layers]
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.fallback = [n for n, _ in left]  # parameter names updated by SGD with momentum
        self._step = 0
        self._sums: dict[int, list] = {}  # layer index -> [A sum, G sum, count] of this step
        self._collect = True
        ref = weakref.ref(self)
        self._hooks = LayerHooks(self.layers, root=model, on_grad=_on_grad(ref), enabled=_enabled(ref),
                                 hint=_HINT).attach()

    # hooks -----------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (after this, ``step`` preconditions with the
        factors it has and collects no new ones)."""
        self._hooks.remove()

    def __del__(self) -> None:
        hooks = getattr(self, "_hooks", None)
        if hooks is not None:
            hooks.remove()

    def _accumulate(self, i: int, x: Tensor, g: Tensor) -> None:
        module = self.layers[i].module
        with torch.no_grad():
            rows, T = input_rows(module, x)
            n = rows.shape[0] // T
            A = activation_factor(rows[:, self.layers[i].columns()], n)  # the chosen parameters' columns
            G = gradient_factor(output_rows(module, g[None]) * n ** 0.5, T)
            s = self._sums.get(i)
            if s is None:
                self._sums[i] = [A, G, 1]
            else:
                s[0], s[1], s[2] = s[0] + A, s[1] + G, s[2] + 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, and the factor statistics of a backward whose step never came
        (e.g. one that ``GradScaler`` skipped for an overflow) are dropped with the gradients."""
        self._sums.clear()
        self._hooks.clear()
        super().zero_grad(set_to_none=set_to_none)

    # the step --------------------------------------------------------------------------
    def _layer_state(self, i: int) -> dict:
        return self.state[self._lparams[i][0]]

    def _new_factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """This step's factors (micro-batches averaged, then ranks averaged), EMA'd, not stored."""
        stats = []
        for i, layer in enumerate(self.layers):
            s = self._sums.get(i)
            if s is None:
                p, (out, cols) = self._lparams[i][0], layer.shape
                cols = len(range(*layer.columns().indices(cols)))
                z = dict(dtype=state_dtype(p), device=p.device)
                s = [torch.zeros(cols, cols, **z), torch.zeros(out, out, **z), 0]
            stats.append(s)
        counts = [s[2] for s in stats]
        if stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            c = [torch.tensor(float(n), dtype=s[0].dtype, device=s[0].device) for n, s in zip(counts, stats)]
            _all_reduce_sum([[s[0], s[1], t] for s, t in zip(stats, c)])
            counts = torch.stack([t.to(c[0]) for t in c]).tolist()  # ranks agree on which layers ran
        new = {}
        for i, ((A, G, _), count) in enumerate(zip(stats, counts)):
            if not count:
                continue  # the layer ran no forward/backward on this step
            A, G = A / count, G / count
            st = self._layer_state(i)
            if "kfac_A" in st:
                A = torch.lerp(A, st["kfac_A"], self.ema)
                G = torch.lerp(G, st["kfac_G"], self.ema)
            new[i] = (A, G)
        return new

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One K-FAC step from the gradients in ``p.grad``; returns ``closure()`` if given.

        Raises ``NonFiniteError`` (parameters and state unchanged) on a NaN/inf gradient or factor.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._update(self._new_factors() if self._collect else {})
        finally:
            self._sums.clear()
            self._hooks.clear()
        return loss

    def _update(self, new: dict[int, tuple[Tensor, Tensor]]) -> None:
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if not all_finite(grads + [t for pair in new.values() for t in pair]):  # one host sync
            raise_non_finite("a K-FAC factor", grads=grads)
        invert = self._step % self.inverse_update_each == 0
        for i, (A, G) in new.items():
            st = self._layer_state(i)
            st["kfac_A"], st["kfac_G"] = A, G
            if not invert and "kfac_QA" not in st:
                st.update(zip(_EIG, kron_eigen(A, G)))
        if invert:
            for i in range(len(self.layers)):
                st = self._layer_state(i)
                if "kfac_A" in st:
                    st.update(zip(_EIG, kron_eigen(st["kfac_A"], st["kfac_G"])))
        directions = {}
        for i, (layer, ps) in enumerate(zip(self.layers, self._lparams)):
            st = self._layer_state(i)
            if "kfac_QA" not in st or any(p.grad is None for p in ps):
                continue  # no factors yet (or no gradient): these parameters take the plain gradient
            M = layer.to_matrix([p.grad.to(state_dtype(p))[None] for p in ps])[0]
            D = kron_solve(M, tuple(st[k] for k in _EIG), group_of[id(ps[0])]["damping"])
            directions.update(zip(map(id, ps), (d[0] for d in layer.from_matrix(D[None]))))
        if self.kl_clip is not None and directions:
            self._clip(directions, group_of)
        for g in self.param_groups:
            lr, mom, wd = g["lr"], g["momentum"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                d = directions.get(id(p))
                d = p.grad.to(state_dtype(p)) if d is None else d
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mom).add_(d)
                x = p.to(state_dtype(p))
                p.copy_(x * (1 - lr * wd) - lr * buf)
        self._step += 1
        self._collect = self._due() or any("kfac_A" not in self._layer_state(i) for i in range(len(self.layers)))

    def _clip(self, directions: dict, group_of: dict) -> None:
        """Scale the preconditioned directions by ``min(1, sqrt(kl_clip / sum lr^2 <d, g>))``: the
        update's predicted change of the model's output distribution (KL, by the Fisher model) stays
        under ``kl_clip``. On the device, no host sync."""
        params = [p for g in self.param_groups for p in g["params"] if id(p) in directions]
        vg = sum(group_of[id(p)]["lr"] ** 2 * (directions[id(p)] * p.grad.to(directions[id(p)].dtype)).sum()
                 for p in params)
        nu = (self.kl_clip / vg.clamp_min(torch.finfo(vg.dtype).tiny)).sqrt().clamp_max(1.0)
        for p in params:
            directions[id(p)] = directions[id(p)] * nu.to(directions[id(p)].dtype)

    def _due(self) -> bool:
        return self._step % self.factor_update_each == 0

    # state -----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"step": self._step}

    def _load_extra_state(self, extra: dict) -> None:
        self._step = int(extra["step"])
        self._collect = self._due() or any("kfac_A" not in self._layer_state(i) for i in range(len(self.layers)))


def _on_grad(ref: weakref.ref):
    """The backward's gradient at a layer's output (hooks hold only a weakref to the optimizer)."""
    def fn(layer, x: Tensor, g: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._accumulate(opt._index[layer.name], x, g)
    return fn


def _enabled(ref: weakref.ref):
    def fn() -> bool:
        opt = ref()
        return opt is not None and opt._collect
    return fn


def _all_reduce_sum(stats: list[list[Tensor]]) -> None:
    """Sum every rank's factor statistics in place: one all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for s in stats:
        for t in s:
            by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        for t, chunk in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(chunk.view_as(t))


__all__ = ["KFAC"]
