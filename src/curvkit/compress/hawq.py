r"""HAWQ mixed-precision bit allocation (HAWQ-V2's objective, HAWQ-V3's integer program).

Each quantized layer ``l`` (linear, conv2d and embedding weights) gets one bit width ``b`` from
``bits``. The cost of a choice is HAWQ-V2's

    Omega = sum_l  Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2,

the average eigenvalue of the layer's curvature block (trace over parameter count, the block
being the layer's weight and bias, as in the report's per-layer section) times the squared
quantization perturbation. The **predicted loss increase** is ``Omega / 2``: the second-order
Taylor expansion ``dL = g^T dw + dw^T H dw / 2`` with the gradient term dropped (a trained model
sits at a minimum, ``g ~ 0``) and ``H_l`` replaced by ``Tr(H_l)/n_l * I`` within each layer and 0
across layers (HAWQ-V2's approximation; a cross-layer term is not modelled).

The stored **size** (bytes) counts every parameter of the model: each quantized weight at
``quantizer.storage_bits((out, cols))`` (its codes and per-channel scales), everything else
(biases, norms, positional tables, layers outside ``params``) at its dtype's size.

- ``method="v3"``: the plan is the exact solution of the integer linear program (one binary per
  layer and choice, one choice per layer, the size and the optional latency/BOPs budgets as
  rows), solved by ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0): minimum
  Omega under a size budget, or minimum size under a loss budget; ties are broken towards the
  smaller size (resp. smaller Omega) by a second solve.
- ``method="v2"``: the plan is the point of the exact Pareto frontier of (size, Omega) that
  fits the budgets (HAWQ-V2's selection).

Both return the whole frontier, computed exactly by dynamic programming over the layers with
dominance pruning (every non-dominated (size, Omega) pair of the full product of choices).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ArgumentError, FallbackWarning, NonFiniteError
from ..model import layers as find_layers
from ..model.params import resolve_params
from .calibration import fake_quantize, matrix_view
from .quantizers import Quantizer, UniformQuantizer, stored_bits
from .results import evaluate
from .sensitivity import Sensitivity, sensitivity as layer_sensitivities

QUANTIZED_KINDS = ("linear", "conv2d", "embedding")


# ----------------------------------------------------------------------------------------------
def weight_matrix(module: nn.Module, transposed: bool) -> Tensor:
    """A layer's weight as the quantizer's matrix ``(out, cols)``, detached."""
    return matrix_view(module, transposed).detach()


def _module(model: nn.Module, name: str) -> nn.Module:
    return model if name == "(root)" else model.get_submodule(name)


@dataclass
class FrontierPoint:
    """One Pareto-optimal allocation: ``size`` (bytes), ``omega``, ``predicted_loss_delta`` =
    omega / 2, ``bits`` {layer: b}; ``measured_loss`` after :meth:`BitPlan.measure`."""

    size: float
    omega: float
    bits: dict[str, int]
    latency: float | None = None
    bops: float | None = None
    measured_loss: float | None = None

    @property
    def predicted_loss_delta(self) -> float:
        return self.omega / 2

    def to_dict(self) -> dict:
        return {"size": self.size, "omega": self.omega, "predicted_loss_delta": self.predicted_loss_delta,
                "bits": dict(self.bits), "latency": self.latency, "bops": self.bops,
                "measured_loss": self.measured_loss}


@dataclass
class BitPlan:
    """A mixed-precision plan: ``bits`` {layer: bit width}, its ``size`` (bytes of stored
    weights, scales included, and of the unquantized parameters), ``omega`` and
    ``predicted_loss_delta`` (omega / 2), and the ``frontier`` (Pareto-optimal points, ascending
    size, descending omega). ``layers``: per quantized layer, its mean trace, parameter count,
    and per bit width its perturbation, omega term and size. ``fixed_size``: bytes of what is not
    quantized. ``measured_loss`` / ``base_loss``: after :meth:`measure`."""

    bits: dict[str, int]
    size: float
    omega: float
    method: str
    frontier: list[FrontierPoint]
    layers: list[dict]
    fixed_size: float
    choices: tuple[int, ...]
    budget: dict
    quantizer: Callable[[int], Quantizer] = field(repr=False)
    transposed: dict[str, bool] = field(repr=False, default_factory=dict)
    latency: float | None = None
    bops: float | None = None
    measured_loss: float | None = None
    base_loss: float | None = None
    sensitivity: Sensitivity | None = field(repr=False, default=None)
    warnings: list[str] = field(default_factory=list)

    @property
    def predicted_loss_delta(self) -> float:
        return self.omega / 2

    def apply(self, model: nn.Module, inplace: bool = False, bits: Mapping[str, int] | None = None) -> nn.Module:
        """A copy of ``model`` (the model itself with ``inplace=True``) with each planned layer's
        weight fake-quantized at its bits (``bits`` overrides the plan, e.g. a frontier point's).
        Cost: one fit and round per layer weight, no pass over data; memory: a copy of the model."""
        bits = self.bits if bits is None else bits
        out = model if inplace else copy.deepcopy(model)
        for name, b in bits.items():
            try:
                module = _module(out, name)
            except AttributeError as e:
                raise ArgumentError(f"the plan quantizes layer {name!r}, which this model does not have; apply a "
                                    "plan to the architecture it was made for") from e
            fake_quantize(module, self.transposed.get(name, False), self.quantizer(b))
        return out

    def measure(self, model: nn.Module, loss_fn: Any, data: Any, *, max_points: int | None = None,
                max_batch: int | None = None) -> BitPlan:
        """Fill ``measured_loss`` of the plan and of each frontier point (``max_points``: that
        many points evenly spread over the frontier, None = all) and ``base_loss`` (the model
        unquantized), each the mean loss over ``data`` of the fake-quantized copy (curvkit's data
        loop, eval mode). Returns self. Cost: one forward pass over ``data`` per point, plus two."""
        self.base_loss = evaluate(model, loss_fn, data, max_batch=max_batch)["loss"]
        pts = self.frontier
        if max_points is not None and len(pts) > max_points:
            idx = np.unique(np.linspace(0, len(pts) - 1, max_points).round().astype(int))
            pts = [pts[i] for i in idx]
        for p in pts:
            p.measured_loss = evaluate(self.apply(model, bits=p.bits), loss_fn, data, max_batch=max_batch,
                                       what="loss of the quantized model")["loss"]
        self.measured_loss = evaluate(self.apply(model), loss_fn, data, max_batch=max_batch,
                                      what="loss of the quantized model")["loss"]
        return self

    def plot(self, path: str | Path) -> Path:
        """Size against predicted (base + omega/2, where measured) and measured loss over the
        frontier, the plan marked; a PNG at ``path`` (needs matplotlib). Free."""
        from .plots import plot_frontier

        return plot_frontier(self, Path(path))

    def to_dict(self) -> dict:
        return {
            "method": self.method, "bits": dict(self.bits), "size": self.size, "omega": self.omega,
            "predicted_loss_delta": self.predicted_loss_delta, "latency": self.latency, "bops": self.bops,
            "measured_loss": self.measured_loss, "base_loss": self.base_loss, "fixed_size": self.fixed_size,
            "choices": list(self.choices), "budget": dict(self.budget), "layers": self.layers,
            "frontier": [p.to_dict() for p in self.frontier], "quantizer": repr(self.quantizer(self.choices[0])),
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None,
            "warnings": list(self.warnings),
            "definition": "omega = sum_l Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2 (HAWQ-V2); predicted_loss_delta = "
                          "omega / 2 (second-order Taylor, gradient term dropped); size in bytes of every "
                          "parameter, quantized weights with their scales",
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def allocate_bits(
    model: nn.Module,
    loss_fn: Any = None,
    data: Any = None,
    bits: tuple[int, ...] | list[int] = (2, 4, 8),
    *,
    size_budget: float | str | None = None,
    loss_budget: float | None = None,
    params: Any = None,
    sensitivity: Sensitivity | None = None,
    method: str = "v3",
    quantizer: Callable[[int], Quantizer] | None = None,
    latency: Mapping[str, Mapping[int, float]] | None = None,
    latency_budget: float | None = None,
    bops_budget: float | None = None,
    activation_bits: int = 8,
    curvature: str | Any = "hessian",
    probes: int = 30,
    max_batch: int | None = None,
    seed: int | torch.Generator | None = 0,
    progress: bool | None = None,
) -> BitPlan:
    r"""Choose each layer's weight bit width from ``bits`` to minimise HAWQ-V2's predicted loss
    increase under ``size_budget`` (bytes, or ``"<N>bit"``: the size of every quantized layer at
    ``N`` bits, one of ``bits``), or the size under ``loss_budget`` (predicted loss increase,
    omega / 2); exactly one of the two. See the module docstring for the objective.

    Args:
        params: the layers to quantize (curvkit's parameter spellings: names, a regex, a module);
            the linear, conv2d and embedding layers whose weight is chosen are quantized.
        sensitivity: a :func:`~curvkit.compress.sensitivity.sensitivity` result to reuse (its
            traces); then ``loss_fn`` and ``data`` are not needed.
        method: "v3" (integer program) or "v2" (Pareto frontier point).
        quantizer: a factory ``bits -> Quantizer``; default per-channel symmetric
            :class:`UniformQuantizer`.
        latency, latency_budget: ``latency[layer][b]`` a layer's cost at ``b`` bits (any unit) and
            the budget on their sum (every quantized layer and bit width must be given).
        bops_budget: a budget on bit operations ``sum_l MACs_l * b_l * activation_bits`` (MACs
            per example, measured on one forward of the first batch; an embedding has none).
        curvature, probes: what sensitivity is computed when none is given ("hessian", "ggn",
            "fisher"); ``probes`` Hutch++ probes per layer.

    A negative trace estimate (an indefinite Hessian, or Hutch++ noise around 0) is clamped at 0
    with a :class:`FallbackWarning`: a negative weight would reward perturbing the layer, which a
    second-order model cannot promise; ``curvature="ggn"`` is positive semi-definite.

    Cost: the sensitivity (``probes`` products per quantized layer block, one pass over ``data``
    each block of up to 64), none when ``sensitivity`` is given; one fit and round per layer and
    bit width; the frontier's dynamic program, O(layers x |bits| x frontier size) in time and
    O(layers x frontier size) in memory; two ILP solves (v3), of ``layers x |bits|`` binaries.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    choices = _check_bits(bits)
    if method not in ("v2", "v3"):
        raise ArgumentError(f"method must be 'v3' (integer program) or 'v2' (Pareto frontier), got {method!r}")
    if (size_budget is None) == (loss_budget is None):
        raise ArgumentError("give exactly one of size_budget= (bytes; minimise the predicted loss) or loss_budget= "
                            "(predicted loss increase; minimise the size)")
    uniform = _uniform_width(size_budget, choices) if isinstance(size_budget, str) else None
    for nm, v in (("size_budget", None if uniform else size_budget), ("loss_budget", loss_budget),
                  ("latency_budget", latency_budget),
                  ("bops_budget", bops_budget)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ArgumentError(f"{nm} must be a finite number >= 0, got {v!r}")
    if (latency is None) != (latency_budget is None):
        raise ArgumentError("latency= (per-layer, per-bits costs) and latency_budget= go together; give both or neither")
    make_q = quantizer if quantizer is not None else (lambda b: UniformQuantizer(b))
    if not callable(make_q):
        raise ArgumentError(f"quantizer must be a factory bits -> Quantizer (e.g. lambda b: UniformQuantizer(b)), "
                            f"got {type(make_q).__name__}")

    named = resolve_params(model, params)
    targets = [layer for layer in find_layers(model, named) if layer.kind in QUANTIZED_KINDS and layer.weight]
    if not targets:
        kinds = sorted({layer.kind for layer in find_layers(model, named)})
        raise ArgumentError(f"no layer to quantize among the chosen parameters (their kinds: {kinds}); bit allocation "
                            f"quantizes the weights of {QUANTIZED_KINDS} layers: choose some with params=")
    if sensitivity is None:
        if loss_fn is None or data is None:
            raise ArgumentError("allocate_bits needs loss_fn and data to measure the layers' sensitivity, or a "
                                "sensitivity= computed before (compress.sensitivity(...))")
        chosen = [n for layer in targets for n in layer.param_names]  # only the blocks that are quantized
        sensitivity = layer_sensitivities(model, loss_fn, data, chosen, curvature=curvature,
                                          quantities=("trace",), probes=probes, seed=seed, max_batch=max_batch,
                                          progress=progress)
    log: list[str] = []
    rows, omega, size, weights = [], [], [], []
    for layer in targets:
        try:
            rec = sensitivity[layer.name]
        except KeyError:
            raise ArgumentError(f"the sensitivity given has no layer {layer.name!r} (it has {sensitivity.names}); "
                                "compute it on the same model and params") from None
        if rec.trace is None:
            raise ArgumentError("the sensitivity given has no traces; compute it with quantities including 'trace'")
        if not math.isfinite(rec.trace):
            raise NonFiniteError(f"layer {layer.name!r}'s curvature trace is {rec.trace}; check the model and data for "
                                 "NaN/inf (or a loss that overflows) before allocating bits")
        mean = rec.trace / rec.parameters
        if mean < 0:
            msg = (f"layer {layer.name!r}: the {sensitivity.curvature} trace estimate is {rec.trace:.4g} "
                   f"(stderr {rec.trace_stderr or 0:.3g}) < 0, an indefinite block or noise; its sensitivity is "
                   "taken as 0 (its bits then follow from size alone); use curvature='ggn' for a positive "
                   "semi-definite curvature")
            warnings.warn(msg, FallbackWarning, stacklevel=2)
            log.append(msg)
            mean = 0.0
        W = weight_matrix(layer.module, layer.transposed)
        if not torch.isfinite(W).all():
            raise NonFiniteError(f"layer {layer.name!r}'s weight has NaN/inf entries; it cannot be quantized")
        per = {}
        o_row, s_row = [], []
        for b in choices:
            q = make_q(b)
            pert = float((q.quantize(W, q.fit(W)).to(torch.float64) - W.to(torch.float64)).square().sum())
            sb = int(q.storage_bits(tuple(W.shape)))
            o_row.append(mean * pert)
            s_row.append(sb)
            per[b] = {"perturbation": pert, "omega": mean * pert, "size": sb / 8}
        omega.append(o_row)
        size.append(s_row)
        weights.append(layer.module.weight)
        rows.append({"name": layer.name, "kind": layer.kind, "shape": list(W.shape), "parameters": rec.parameters,
                     "mean_trace": mean, "trace": rec.trace, "trace_stderr": rec.trace_stderr, "choices": per})
    fixed_bits = stored_bits(model, {id(w): 0 for w in weights})
    O, S = np.array(omega, dtype=np.float64), np.array(size, dtype=np.int64)
    names = [layer.name for layer in targets]
    L, B = O.shape

    extra: list[tuple[str, np.ndarray, float]] = []  # (what, per-layer-per-choice cost, budget)
    lat = bops = None
    if latency is not None:
        lat = _latency_table(latency, names, choices)
        extra.append(("latency", lat, float(latency_budget)))
    if bops_budget is not None:
        if data is None:
            raise ArgumentError("bops_budget= needs data (one forward of the first batch counts each layer's MACs)")
        macs = _macs(model, targets, data)
        bops = np.array([[m * b * activation_bits for b in choices] for m in macs], dtype=np.float64)
        extra.append(("bops", bops, float(bops_budget)))

    if uniform is not None:  # the bytes of uniform N-bit weights: this model's own sizes
        size_budget = (fixed_bits + float(S[:, choices.index(uniform)].sum())) / 8
    frontier_idx = pareto_frontier(S, O)
    budget_bits = None if size_budget is None else size_budget * 8 - fixed_bits

    def point(idx: np.ndarray) -> FrontierPoint:
        r = np.arange(L)
        return FrontierPoint((fixed_bits + int(S[r, idx].sum())) / 8, float(O[r, idx].sum()),
                             {n: choices[i] for n, i in zip(names, idx)},
                             None if lat is None else float(lat[r, idx].sum()),
                             None if bops is None else float(bops[r, idx].sum()))

    frontier = [point(idx) for idx in frontier_idx]
    smallest, largest = frontier[0].size, frontier[-1].size

    def fits(idx: np.ndarray) -> bool:
        r = np.arange(L)
        return all(float(c[r, idx].sum()) <= bud * (1 + 1e-12) for _, c, bud in extra)

    if method == "v2":
        if size_budget is not None:
            ok = [i for i, (p, idx) in enumerate(zip(frontier, frontier_idx)) if p.size <= size_budget and fits(idx)]
            pick = ok[-1] if ok else None
        else:
            ok = [i for i, (p, idx) in enumerate(zip(frontier, frontier_idx))
                  if p.omega / 2 <= loss_budget and fits(idx)]
            pick = ok[0] if ok else None
        if pick is None:
            _infeasible(size_budget, loss_budget, frontier, extra, S, O, fixed_bits, milp)
        idx = frontier_idx[pick]
    else:
        n = L * B
        A_one = np.kron(np.eye(L), np.ones((1, B)))
        rows_c = [LinearConstraint(A_one, 1, 1)]
        for _, c, bud in extra:
            rows_c.append(LinearConstraint(c.reshape(1, -1), -np.inf, bud))
        integrality, bounds = np.ones(n), Bounds(0, 1)
        scale = float(O.max()) if O.max() > 0 else 1.0
        Sf, Of = S.reshape(-1).astype(np.float64), O.reshape(-1) / scale

        def solve(c: np.ndarray, more: list) -> np.ndarray | None:
            res = milp(c, constraints=rows_c + more, integrality=integrality, bounds=bounds,
                       options={"mip_rel_gap": 0.0})
            return None if res.x is None or res.status != 0 else res.x.reshape(L, B).argmax(1)

        if size_budget is not None:
            first = solve(Of, [LinearConstraint(Sf.reshape(1, -1), -np.inf, budget_bits)])
            if first is None:
                _infeasible(size_budget, loss_budget, frontier, extra, S, O, fixed_bits, milp)
            best = float(Of.reshape(L, B)[np.arange(L), first].sum())
            second = solve(Sf, [LinearConstraint(Sf.reshape(1, -1), -np.inf, budget_bits),
                                LinearConstraint(Of.reshape(1, -1), -np.inf, best + 1e-9 * max(best, 1e-12))])
            idx = second if second is not None else first
        else:
            cap = 2 * loss_budget / scale
            first = solve(Sf, [LinearConstraint(Of.reshape(1, -1), -np.inf, cap)])
            if first is None:
                _infeasible(size_budget, loss_budget, frontier, extra, S, O, fixed_bits, milp)
            smin = int(S[np.arange(L), first].sum())
            second = solve(Of, [LinearConstraint(Of.reshape(1, -1), -np.inf, cap),
                                LinearConstraint(Sf.reshape(1, -1), -np.inf, smin)])
            idx = second if second is not None else first
    chosen = point(np.asarray(idx))
    budget = {"size_budget": size_budget, "loss_budget": loss_budget, "latency_budget": latency_budget,
              "bops_budget": bops_budget, "smallest_size": smallest, "largest_useful_size": largest}
    return BitPlan(chosen.bits, chosen.size, chosen.omega, method, frontier, rows, fixed_bits / 8, choices, budget,
                   make_q, {layer.name: layer.transposed for layer in targets}, chosen.latency, chosen.bops,
                   sensitivity=sensitivity, warnings=log)


def _uniform_width(size_budget: str, choices: tuple[int, ...]) -> int:
    """``"<N>bit"`` -> N, which must be one of ``choices``."""
    text = size_budget.strip().lower()
    if not (text.endswith("bit") and text[:-3].isdigit()):
        raise ArgumentError(f"size_budget must be a number of bytes or '<N>bit' (the size of uniform N-bit weights, "
                            f"e.g. '4bit'), got {size_budget!r}")
    b = int(text[:-3])
    if b not in choices:
        raise ArgumentError(f"size_budget={size_budget!r} is the size of uniform {b}-bit weights: it needs {b} among "
                            f"the bit widths {list(choices)}")
    return b


def _check_bits(bits: Any) -> tuple[int, ...]:
    try:
        vals = list(bits)
    except TypeError:
        vals = None
    if not vals or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 2 for b in vals):
        raise ArgumentError(f"bits must be a non-empty sequence of integers >= 2 (e.g. (2, 4, 8)), got {bits!r}")
    return tuple(sorted({int(b) for b in vals}))


def _latency_table(latency: Mapping, names: list[str], choices: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((len(names), len(choices)))
    for i, n in enumerate(names):
        if n not in latency:
            raise ArgumentError(f"latency has no entry for layer {n!r}; give latency[layer][bits] for every quantized "
                                f"layer ({names})")
        for j, b in enumerate(choices):
            if b not in latency[n]:
                raise ArgumentError(f"latency[{n!r}] has no cost for {b} bits; give one for each of {choices}")
            out[i, j] = float(latency[n][b])
    return out


def _macs(model: nn.Module, targets: list, data: Any) -> list[float]:
    """Multiply-accumulates per example of each target layer, from one forward of the first batch
    (curvkit's hook manager records the inputs; each layer is re-run on its input for its output's
    size). An embedding is a lookup: 0."""
    from ..model import Batches, LayerHooks

    _, x, y = next(iter(Batches(data)))
    hooks = LayerHooks(targets, root=model)
    was = model.training
    model.eval()
    try:
        with hooks, torch.enable_grad():
            args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
            model(*args, **kwargs)
        out = []
        with torch.no_grad():
            for layer in targets:
                if layer.kind == "embedding" or layer.name not in hooks.inputs:
                    out.append(0.0)
                    continue
                o = layer.module(hooks.inputs[layer.name])
                rows = weight_matrix(layer.module, layer.transposed).shape[0]
                out.append(layer.module.weight.numel() * o.numel() / (rows * y.shape[0]))
    finally:
        model.train(was)
    return out


def pareto_frontier(S: np.ndarray, O: np.ndarray) -> list[np.ndarray]:
    """Every non-dominated (size, omega) allocation of ``L`` layers with ``B`` choices each (``S``,
    ``O`` of shape (L, B): a choice's size and omega), as choice indices, ascending size: exact
    dynamic programming over the layers, keeping after each layer only the points no other point
    beats on both size and omega (a dominated partial sum stays dominated whatever follows).
    Cost: O(L * B * F log(B F)) for F points kept; memory O(L * F)."""
    L, B = S.shape
    sizes, omegas = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    for layer in range(L):
        s = (sizes[:, None] + S[layer][None, :]).reshape(-1)
        o = (omegas[:, None] + O[layer][None, :]).reshape(-1)
        order = np.lexsort((o, s))  # by size, then omega
        s, o = s[order], o[order]
        runmin = np.minimum.accumulate(o)
        keep = np.ones(len(s), dtype=bool)
        keep[1:] = o[1:] < runmin[:-1]  # strictly better than every smaller-or-equal-size point
        order = order[keep]
        parents.append((order // B, order % B))
        sizes, omegas = s[keep], o[keep]
    out = []
    for k in range(len(sizes)):
        idx = np.zeros(L, dtype=np.int64)
        j = k
        for layer in range(L - 1, -1, -1):
            par, ch = parents[layer]
            idx[layer] = ch[j]
            j = par[j]
        out.append(idx)
    return out


def _infeasible(size_budget, loss_budget, frontier, extra, S, O, fixed_bits, milp) -> None:
    from scipy.optimize import Bounds, LinearConstraint

    L, B = S.shape
    smallest, largest = frontier[0].size, frontier[-1].size
    limits = ", ".join(f"{w} <= {bud:g}" for w, _, bud in extra)
    if extra:  # the smallest size that also meets the latency/BOPs budgets, if any does
        A_one = np.kron(np.eye(L), np.ones((1, B)))
        cons = [LinearConstraint(A_one, 1, 1)] + [LinearConstraint(c.reshape(1, -1), -np.inf, bud) for _, c, bud in extra]
        res = milp(S.reshape(-1).astype(np.float64), constraints=cons, integrality=np.ones(L * B), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            least = {w: float(c.min(1).sum()) for w, c, _ in extra}
            raise ArgumentError(f"no allocation meets {limits}: the least each can be is {least}; raise those budgets "
                                "or add smaller bit widths")
        smallest = (fixed_bits + float(res.fun)) / 8
    if size_budget is not None:
        raise ArgumentError(
            f"no allocation fits size_budget={size_budget:g} bytes{' with ' + limits if limits else ''}: the smallest "
            f"feasible size is {smallest:g} bytes ({fixed_bits / 8:g} of them the unquantized parameters) and sizes "
            f"above {largest:g} bytes (every layer at its most bits) change nothing; choose a budget between them "
            "or add smaller bit widths")
    least = float(O.min(1).sum()) / 2
    raise ArgumentError(
        f"no allocation has a predicted loss increase <= loss_budget={loss_budget:g}{' with ' + limits if limits else ''}"
        f": the smallest reachable is {least:g} (every layer at its most bits); raise the budget to at least that, or "
        "add larger bit widths")


__all__ = ["allocate_bits", "BitPlan", "FrontierPoint", "pareto_frontier", "weight_matrix", "fake_quantize",
           "QUANTIZED_KINDS"]
