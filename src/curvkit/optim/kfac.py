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
from ..errors import ArgumentError, LossError, ModelError
from ..model import LayerHooks, resolve_params
from ._base import CurvkitOptimizer, Staged, check_number, check_positive_int, refresh_due, renamed, state_dtype
from ._moments import heavy_ball

_HINT = "Train that layer with another optimizer: pass KFAC(model, params=...) without its parameters"
_KEYS = ("kfac_A", "kfac_G")
_EIG = ("kfac_dA", "kfac_QA", "kfac_dG", "kfac_QG")


class KFAC(CurvkitOptimizer):
    r"""K-FAC: gradients of linear (``nn.Linear`` and modules computing ``x W^T + b`` or ``x W + b``,
    as GPT-2's ``Conv1D``) and ``nn.Conv2d`` layers preconditioned by ``(A (x) G + damping I)^{-1}``,
    then momentum and decoupled weight decay.

    On factor-update steps (every ``factor_every``) forward hooks keep each layer's input and
    tensor hooks on its output take the backward's gradient ``dL/ds``; the factors
    ``A = a~^T a~ / N`` and ``G = N (dL/ds)^T (dL/ds) / T`` (empirical Fisher of a loss that
    averages over the ``N`` examples of the batch; ``T`` conv positions per example) enter
    exponential moving averages with weight ``ema`` (the first update sets them). Every
    ``inverse_every`` steps both are eigendecomposed (``matfun.sym_eigh``) and the update
    direction of a layer with gradient ``M = [dW | db]`` is the exact damped solve
    ``Q_G [(Q_G^T M Q_A) / (d_G d_A^T + damping)] Q_A^T``. Then, for every parameter,
    ``buf = momentum * buf + direction`` and ``p = p (1 - lr weight_decay) - lr buf``.

    Parameters K-FAC cannot precondition (norms, embeddings, grouped convs, tied weights) get
    plain SGD with the same momentum and weight decay (``fallback`` lists them, ``fallback_reasons``
    says why); when that is every chosen parameter, the constructor raises ModelError naming why
    each fell back. Factors and all state are float32 for bf16/fp16 models (float64 stays
    float64). Under ``torch.distributed`` (world size > 1) the factor statistics are averaged over
    ranks before the EMA, so ranks stay identical. A NaN/inf gradient or factor raises
    ``NonFiniteError`` before any parameter or state is written. A layer called twice in one
    forward (weight sharing) raises ``ModelError``.

    Args: every hyperparameter is per param group (``lr``, ``momentum``, ``weight_decay``
    (decoupled), ``damping``, the schedule ``factor_every``/``inverse_every`` (step 0 does both),
    ``ema`` (the weight of the old factors) and ``kl_clip``); a layer follows the group of its
    weight. ``kl_clip`` (default 1e-3, as in Ba et al. 2017 and the common K-FAC
    implementations; ``None`` turns it off) scales a group's preconditioned directions by
    ``min(1, sqrt(kl_clip / sum lr^2 <d, g>))`` so a step's predicted KL change stays bounded --
    without it K-FAC with small damping takes huge steps along directions of tiny curvature and
    diverges in a few steps. ``params`` (a ``ck`` parameter spec: names, a regex, a predicate,
    tensors; or a list of param groups ``{"params": spec, "lr": ...}``) restricts what this
    optimizer trains. ``factor_update_each``/``inverse_update_each`` are the deprecated names of
    ``factor_every``/``inverse_every``. ``G`` assumes the loss averages over examples (as
    cross-entropy does); a loss that also averages over outputs (``MSELoss`` over ``d`` outputs)
    gives ``G / d`` relative to ``ck.kfac(..., kind="empirical")``, layers applied at ``S``
    positions per example (sequences) give ``G / S``, and a loss divided by ``k`` for gradient
    accumulation gives ``G / k^2``: each only rescales the effective damping (and the KL clip).
    Under fp16 ``GradScaler`` the hooks see scaled gradients, so ``G`` carries the scale squared:
    use bf16 autocast, which needs no scaler. ``remove_hooks()`` detaches it from the model.

    Cost per step: the backward the user runs; on factor-update steps one ``(rows x cols)``
    Gram matrix for each factor of each layer (conv inputs unfolded) and activations kept
    until backward (other steps: the hooks store nothing); every ``inverse_every`` steps
    two ``eigh`` per layer; per step four small matrix products per layer.

    >>> import torch
    >>> from curvkit.optim import KFAC
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = KFAC(model, lr=0.1, damping=1e-2, inverse_every=5)
    >>> for i in range(30):
    ...     opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    ...     first = loss.item() if i == 0 else first
    >>> bool(loss.item() < first / 2)
    True
    >>> opt.remove_hooks()
    """

    _renamed = {"factor_update_each": "factor_every", "inverse_update_each": "inverse_every"}

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, factor_every: int = 1, inverse_every: int = 10,
                 ema: float = 0.95, kl_clip: float | None = 1e-3, params: Any = None,
                 factor_update_each: int | None = None, inverse_update_each: int | None = None):
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"KFAC needs the model itself (it hooks its layers), got {type(model).__name__}; "
                "use KFAC(model, lr=...) rather than KFAC(model.parameters(), ...)"
            )
        factor_every = renamed("KFAC", "factor_every", factor_every, 1, "factor_update_each", factor_update_each)
        inverse_every = renamed("KFAC", "inverse_every", inverse_every, 10, "inverse_update_each", inverse_update_each)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        factor_every=factor_every, inverse_every=inverse_every, ema=ema, kl_clip=kl_clip)
        self._check_group(defaults)
        groups = _param_groups(model, params)
        named = [np for _, g in groups for np in g]
        super().__init__([{**over, "params": [p for _, p in g]} for over, g in groups], defaults)
        self.layers, left = kron_layers(model, named)
        self.fallback = [n for n, _ in left]  # parameter names updated by SGD with momentum
        self.fallback_reasons = dict(left)
        if not self.layers:
            why = "; ".join(f"{n}: {r}" for n, r in left)
            raise ModelError(
                f"K-FAC would precondition none of the chosen parameters, and train them all with plain SGD: "
                f"{why}. K-FAC handles linear and Conv2d layers; train these with another optimizer "
                "(torch.optim.SGD, or curvkit's Shampoo or AdaHessian)"
            )
        by_name = dict(named)
        self._lparams = [[by_name[n] for n in layer.kron_params()] for layer in self.layers]
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        self._step = 0
        self._sums: dict[int, list] = {}  # layer index -> [A sum, G sum, count] of this step
        self._grad_of: dict[int, Tensor] = {}  # layer index -> the input of the forward its last gradient came from
        self._repeated: str | None = None  # a layer that saw two backward passes of one forward this step
        self._collecting = self._due_layers()
        ref = weakref.ref(self)
        self._hooks = LayerHooks(self.layers, root=model, on_grad=_on_grad(ref), enabled=_enabled(ref),
                                 hint=_HINT).attach()

    @staticmethod
    def _check_group(g: dict) -> None:
        check_number("lr", g["lr"])
        check_number("damping", g["damping"], strict=True)
        check_number("momentum", g["momentum"], high=1.0)
        check_number("weight_decay", g["weight_decay"])
        check_number("ema", g["ema"], high=1.0)
        check_positive_int("factor_every", g["factor_every"])
        check_positive_int("inverse_every", g["inverse_every"])
        if g["kl_clip"] is not None:
            check_number("kl_clip", g["kl_clip"], strict=True)

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
        if i not in self._collecting:
            return
        if self._grad_of.get(i) is x:  # a second backward through the same forward: refused at step()
            self._repeated = self.layers[i].name
            return
        self._grad_of[i] = x
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
        self._grad_of.clear()
        self._repeated = None
        self._hooks.clear()
        super().zero_grad(set_to_none=set_to_none)

    # the schedule ----------------------------------------------------------------------
    def _layer_state(self, i: int) -> dict:
        return self.state.get(self._lparams[i][0], {})

    def _layer_groups(self) -> list[dict]:
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return [group_of[id(ps[0])] for ps in self._lparams]

    def _due_layers(self) -> set[int]:
        """The layers whose factors this step collects: due by their group's ``factor_every``, or
        without factors yet."""
        return {i for i, g in enumerate(self._layer_groups())
                if refresh_due(self._step, g["factor_every"]) or "kfac_A" not in self._layer_state(i)}

    # the step --------------------------------------------------------------------------
    def _new_factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """This step's factors (micro-batches averaged, then ranks averaged), EMA'd, not stored."""
        idx = sorted(self._collecting) if self._hooks.attached else []
        stats = []
        for i in idx:
            s = self._sums.get(i)
            if s is None:
                p, (out, cols) = self._lparams[i][0], self.layers[i].shape
                cols = len(range(*self.layers[i].columns().indices(cols)))
                z = dict(dtype=state_dtype(p), device=p.device)
                s = [torch.zeros(cols, cols, **z), torch.zeros(out, out, **z), 0]
            stats.append(s)
        counts = [s[2] for s in stats]
        if stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            c = [torch.tensor(float(n), dtype=s[0].dtype, device=s[0].device) for n, s in zip(counts, stats)]
            _all_reduce_sum([[s[0], s[1], t] for s, t in zip(stats, c)])
            counts = torch.stack([t.to(c[0]) for t in c]).tolist()  # ranks agree on which layers ran
        groups = self._layer_groups()
        new = {}
        for i, (A, G, _), count in zip(idx, stats, counts):
            if not count:
                continue  # the layer ran no forward/backward on this step
            A, G = A / count, G / count
            st = self._layer_state(i)
            if "kfac_A" in st:
                A = torch.lerp(A, st["kfac_A"], groups[i]["ema"])
                G = torch.lerp(G, st["kfac_G"], groups[i]["ema"])
            new[i] = (A, G)
        return new

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One K-FAC step from the gradients in ``p.grad``; returns ``closure()`` if given.

        Raises ``NonFiniteError`` (parameters and state unchanged) on a NaN/inf gradient or factor.
        """
        loss = self._closure_loss(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        try:
            if self._repeated is not None:
                raise LossError(
                    f"layer {self._repeated!r} received two output gradients from one forward pass since "
                    "zero_grad(): the loss differentiates the network more than once (input derivatives by "
                    "torch.autograd.grad, as a PINN residual takes them, or several backward passes of one "
                    "forward), and K-FAC's factors assume one backward per forward (nothing was changed). "
                    "Train such a loss with curvkit's AdaHessian, Shampoo or SOAP (or Adam); ck.laplacian "
                    "takes a PINN's input derivatives without a backward pass, which K-FAC refuses too"
                )
            self._run_step(self._prepare, "a K-FAC factor", loss, grads)
        finally:
            self._sums.clear()
            self._grad_of.clear()
            self._repeated = None
            self._hooks.clear()
        return loss

    def _prepare(self) -> Staged:
        new = Staged()
        factors = self._new_factors()
        groups = self._layer_groups()
        for A, G in factors.values():
            new.check += [A, G]
        directions: dict[int, Tensor] = {}
        for i, (layer, ps) in enumerate(zip(self.layers, self._lparams)):
            st = self._layer_state(i)
            A, G = factors[i] if i in factors else (st.get("kfac_A"), st.get("kfac_G"))
            if A is None:
                continue  # no factors yet: these parameters take the plain gradient
            state = self._staged_state(ps[0], new)
            for k, v in zip(_KEYS, (A, G)):
                if i in factors:
                    new.put(state, k, v, check=False)
            if refresh_due(self._step, groups[i]["inverse_every"]) or "kfac_QA" not in st:
                eig = kron_eigen(A, G)
                for k, v in zip(_EIG, eig):
                    new.put(state, k, v, check=False)
            else:
                eig = tuple(st[k] for k in _EIG)
            if any(p.grad is None for p in ps):
                continue
            M = layer.to_matrix([p.grad.to(state_dtype(p))[None] for p in ps])[0]
            D = kron_solve(M, eig, groups[i]["damping"])
            directions.update(zip(map(id, ps), (d[0] for d in layer.from_matrix(D[None]))))
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            if g["kl_clip"] is not None:
                _clip(directions, [p for p in ps if id(p) in directions], g["lr"], g["kl_clip"])
            ds = [directions.get(id(p), p.grad.to(state_dtype(p))) for p in ps]
            sts = [self._staged_state(p, new) for p in ps]
            bufs = heavy_ball([st["momentum_buffer"] if "momentum_buffer" in st else torch.zeros_like(d)
                               for st, d in zip(sts, ds)], ds, g["momentum"])
            for st, b in zip(sts, bufs):
                new.put(st, "momentum_buffer", b)
            new.move(ps, bufs, lr=g["lr"], weight_decay=g["weight_decay"], check=False)
        new.then(self._advance)
        return new

    def _advance(self) -> None:
        self._step += 1
        self._collecting = self._due_layers()

    # state -----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"step": self._step}

    def _load_extra_state(self, extra: dict) -> None:
        self._step = int(extra["step"])
        self._collecting = self._due_layers()


def _clip(directions: dict, params: list[Tensor], lr: float, kl_clip: float) -> None:
    """Scale the preconditioned directions of ``params`` by ``min(1, sqrt(kl_clip / sum lr^2 <d,
    g>))``: the update's predicted change of the model's output distribution (KL, by the Fisher
    model) stays under ``kl_clip``. On the device, no host sync."""
    if not params:
        return
    vg = sum(lr ** 2 * (directions[id(p)] * p.grad.to(directions[id(p)].dtype)).sum() for p in params)
    nu = (kl_clip / vg.clamp_min(torch.finfo(vg.dtype).tiny)).sqrt().clamp_max(1.0)
    for p in params:
        directions[id(p)] = directions[id(p)] * nu.to(directions[id(p)].dtype)


def _param_groups(model: nn.Module, params: Any) -> list[tuple[dict, list[tuple[str, Tensor]]]]:
    """``[(hyperparameters, [(name, parameter)])]``: one group for a ck parameter spec, or one per
    ``{"params": spec, ...}`` dict of a list of groups; frozen parameters left out."""
    specs = params if isinstance(params, (list, tuple)) and params and all(isinstance(g, dict) for g in params) \
        else [{"params": params}]
    out, seen = [], set()
    for g in specs:
        if "params" not in g:
            raise ArgumentError(f"a param group needs a 'params' entry (a ck parameter spec), got keys {sorted(g)}")
        named = [(n, p) for n, p in resolve_params(model, g["params"]) if p.requires_grad]
        if not named:
            raise ModelError("none of the chosen parameters requires grad; nothing to train")
        twice = [n for n, p in named if id(p) in seen]
        if twice:
            raise ArgumentError(f"parameters {twice} are in more than one param group; put each in one")
        seen.update(id(p) for _, p in named)
        out.append(({k: v for k, v in g.items() if k != "params"}, named))
    return out


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
        return opt is not None and bool(opt._collecting)
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
