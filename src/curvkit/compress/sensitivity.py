r"""Per-layer sensitivity: each layer's curvature block, its trace, top eigenvalue and diagonal,
with their error bars.

This is the one implementation of the report's per-layer section (``curvkit.analyze`` calls
:func:`layer_sensitivity` for its ``layers`` table): the blocks are the operator's own
``blocks("layer")`` (:func:`curvkit.model.layers`), the algorithms ``ck.trace(op, by="layer")``
(Hutch++), ``ck.eigenvalues(op, k=1, by="layer")`` (block Lanczos) and ``ck.diagonal(op,
by="layer")`` (Hutchinson). HAWQ's bit allocation, and any pruning method that wants a layer's
curvature, start here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..model import layers as find_layers

QUANTITIES = ("trace", "top_eigenvalue", "diagonal")
CURVATURES = ("hessian", "ggn", "fisher")


@dataclass
class LayerSensitivity:
    """One layer's block ``H_l`` of the curvature: ``trace`` = tr(H_l) (Hutch++, ``trace_stderr``
    its standard error), ``top_eigenvalue`` = lambda_max(H_l) (Lanczos; ``top_residual`` =
    ||H_l v - lambda v||, ``converged``), ``diagonal`` = diag(H_l) per parameter (name -> tensor
    of the parameter's shape, ``diagonal_stderr`` alike). A quantity not asked for is None."""

    name: str
    type: str
    kind: str
    parameters: int
    param_names: list[str]
    trace: float | None = None
    trace_stderr: float | None = None
    trace_products: int = 0
    top_eigenvalue: float | None = None
    top_residual: float | None = None
    converged: bool | None = None
    eig_products: int = 0
    diagonal: dict[str, Tensor] | None = None
    diagonal_stderr: dict[str, Tensor] | None = None
    diagonal_products: int = 0

    @property
    def mean_trace(self) -> float | None:
        """tr(H_l) / n_l, the average eigenvalue (HAWQ-V2's sensitivity)."""
        return None if self.trace is None else self.trace / self.parameters

    def row(self) -> dict:
        """The JSON row of the report's ``layers`` table (no tensors)."""
        out = {"name": self.name, "type": self.type, "kind": self.kind, "parameters": self.parameters}
        if self.trace is not None:
            out.update(trace=self.trace, trace_stderr=self.trace_stderr, trace_products=self.trace_products)
        if self.top_eigenvalue is not None:
            out.update(top_eigenvalue=self.top_eigenvalue, top_residual=self.top_residual,
                       converged=self.converged, eig_products=self.eig_products)
        if self.diagonal is not None:
            out.update(diagonal_products=self.diagonal_products)
        return out


@dataclass
class Sensitivity:
    """Per-layer sensitivities, in the model's layer order (also a mapping ``name -> layer``).

    ``curvature``: which matrix ("hessian", "ggn", "fisher" or the operator's class name);
    ``cost``: per quantity, the operator ``products``, the ``passes`` over the data (None where
    products come in blocks of up to 64 columns, so passes = ceil(products / 64) per layer) and
    the ``seconds``; ``matvecs``: the products in all."""

    layers: list[LayerSensitivity]
    curvature: str
    quantities: tuple[str, ...]
    probes: int
    seed: Any
    cost: dict[str, dict] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; the layers are {[r.name for r in self.layers]}")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.layers]

    @property
    def matvecs(self) -> int:
        return sum(c["products"] for c in self.cost.values())

    def rows(self) -> list[dict]:
        return [r.row() for r in self.layers]

    def to_dict(self) -> dict:
        """JSON-able summary (the diagonals as per-parameter means, not whole tensors)."""
        rows = self.rows()
        for row, r in zip(rows, self.layers):
            if r.diagonal is not None:
                row["diagonal_mean"] = {n: float(t.mean()) for n, t in r.diagonal.items()}
        return {"curvature": self.curvature, "quantities": list(self.quantities), "probes": self.probes,
                "seed": self.seed if isinstance(self.seed, int) else None, "layers": rows, "cost": self.cost}


def layer_sensitivity(
    op: Any,
    *,
    quantities: tuple[str, ...] | list[str] = ("trace", "top_eigenvalue"),
    probes: int = 30,
    diagonal_probes: int | None = None,
    tol: float = 1e-3,
    block_size: int = 4,
    max_matvecs: int = 400,
    seed: int | torch.Generator | None = 0,
    progress: bool | None = None,
) -> Sensitivity:
    """The per-layer sensitivities of a curvkit curvature operator ``op`` (anything with
    ``blocks("layer")``, ``model`` and ``space``): the code path of the report's per-layer section.

    ``quantities``: any of "trace" (``ck.trace(op, probes=probes, seed=seed, by="layer")``,
    Hutch++), "top_eigenvalue" (``ck.eigenvalues(op, k=1, by="layer", tol=, block_size=,
    max_matvecs=, seed=)``) and "diagonal" (``ck.diagonal(op, diagonal_probes or probes, seed,
    by="layer")``).

    Cost, in products of the layer blocks (each a pass over the data like a product of ``op``):
    ``probes`` per layer for the trace; at most ``max_matvecs`` per layer for the top eigenvalue
    (typically 10-60 to ``tol``); ``diagonal_probes`` per layer for the diagonal. Memory: a layer's
    Lanczos basis (``n_l`` x at most ``max(2k, 20) + 10`` columns) and up to 64 probe columns.
    """
    from .. import diagonal as ck_diagonal, eigenvalues, trace

    quantities = tuple(quantities)
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad or not quantities:
        raise ArgumentError(f"quantities must be a non-empty subset of {QUANTITIES}, got {quantities!r}")
    if not hasattr(op, "blocks") or not hasattr(op, "model"):
        raise ArgumentError(f"per-layer sensitivity needs a curvkit curvature operator (ck.hessian, ck.ggn, "
                            f"ck.fisher), got {type(op).__name__}; pass curvature='hessian' instead")
    named = op.space.named
    found = {layer.name: layer for layer in find_layers(op.model, named)}
    sizes = dict((n, p.numel()) for n, p in named)
    recs = {name: LayerSensitivity(name, type(layer.module).__name__, layer.kind,
                                   sum(sizes[n] for n in layer.param_names), list(layer.param_names))
            for name, layer in found.items()}
    cost: dict[str, dict] = {}

    def timed(q: str, fn):
        t0 = time.perf_counter()
        res = fn()
        cost[q] = {"products": res.matvecs, "passes": None, "seconds": round(time.perf_counter() - t0, 3)}
        return res

    if "trace" in quantities:
        res = timed("trace", lambda: trace(op, probes=probes, seed=seed, by="layer"))
        for name, r in res.items():
            recs[name].trace, recs[name].trace_stderr, recs[name].trace_products = r.value, r.stderr, r.matvecs
    if "top_eigenvalue" in quantities:
        res = timed("top_eigenvalue", lambda: eigenvalues(op, k=1, by="layer", tol=tol, seed=seed,
                                                          block_size=block_size, max_matvecs=max_matvecs,
                                                          progress=progress))
        cost["top_eigenvalue"]["passes"] = sum(r.iterations for _, r in res.items())
        for name, e in res.items():
            rec = recs[name]
            rec.top_eigenvalue, rec.top_residual = float(e.values[0]), float(e.residuals[0])
            rec.converged, rec.eig_products = bool(e.converged), e.matvecs
    if "diagonal" in quantities:
        res = timed("diagonal", lambda: ck_diagonal(op, diagonal_probes or probes, seed, by="layer"))
        shapes = dict((n, p.shape) for n, p in named)
        for name, d in res.items():
            rec, i = recs[name], 0
            rec.diagonal, rec.diagonal_stderr, rec.diagonal_products = {}, {}, d.matvecs
            for n in [m for m, _ in named if m in rec.param_names]:  # the block's (model) order
                k = sizes[n]
                rec.diagonal[n] = d.value[i:i + k].reshape(shapes[n])
                rec.diagonal_stderr[n] = d.stderr[i:i + k].reshape(shapes[n])
                i += k
    kind = type(op).__name__
    curv = {"HessianOperator": "hessian", "GGNOperator": "ggn", "FisherOperator": "fisher"}.get(kind, kind)
    return Sensitivity(list(recs.values()), curv, quantities, probes, seed, cost)


def sensitivity(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any = None,
    *,
    curvature: str | Any = "hessian",
    quantities: tuple[str, ...] | list[str] = ("trace", "top_eigenvalue"),
    probes: int = 30,
    diagonal_probes: int | None = None,
    tol: float = 1e-3,
    block_size: int = 4,
    max_matvecs: int = 400,
    seed: int | torch.Generator | None = 0,
    max_batch: int | None = None,
    progress: bool | None = None,
) -> Sensitivity:
    """Per-layer trace, top eigenvalue and (when asked) diagonal of the curvature of
    ``loss_fn(model(inputs), targets)`` over ``data``, with their standard errors / residuals.

    ``curvature``: "hessian" (``ck.hessian``; can be indefinite, so a trace can be negative),
    "ggn" (``ck.ggn``, positive semi-definite), "fisher" (``ck.fisher``, the empirical Fisher), or
    an operator already built (then ``model``, ``loss_fn``, ``data``, ``params``, ``max_batch`` are
    not used). The defaults (``probes=30``, ``tol=1e-3``, ``block_size=4``, ``max_matvecs=400``) are
    ``curvkit analyze``'s, and this is the code path of its per-layer section
    (:func:`layer_sensitivity`), so the two agree for the same seed.

    Cost: one pass over the batches to build the operator, then ``probes`` products per layer
    for the trace, at most ``max_matvecs`` (typically 10-60) per layer for the top eigenvalue,
    ``diagonal_probes`` (default ``probes``) per layer for the diagonal. A layer block's product
    costs a pass over ``data`` (a Hessian-vector product: about two gradients per batch).

    Example:
        >>> import torch, curvkit as ck
        >>> from curvkit.compress import sensitivity
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        >>> data = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> s = sensitivity(model, torch.nn.CrossEntropyLoss(), data, quantities=("trace",), probes=12)
        >>> s.names, s["0"].trace_products
        (['0', '2'], 12)
    """
    from .. import fisher, ggn, hessian

    if isinstance(curvature, str):
        build = {"hessian": hessian, "ggn": ggn, "fisher": fisher}.get(curvature)
        if build is None:
            raise ArgumentError(f"curvature must be one of {CURVATURES} or a curvkit operator, got {curvature!r}")
        op = build(model, loss_fn, data, params, max_batch=max_batch)
    else:
        op = curvature
    return layer_sensitivity(op, quantities=quantities, probes=probes, diagonal_probes=diagonal_probes, tol=tol,
                             block_size=block_size, max_matvecs=max_matvecs, seed=seed, progress=progress)


__all__ = ["sensitivity", "layer_sensitivity", "Sensitivity", "LayerSensitivity", "QUANTITIES"]
