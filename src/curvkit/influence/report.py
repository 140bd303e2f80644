"""``influence_report``: for each query its most helpful and harmful training examples, the
self-influence ranking ("find my mislabeled data") and how to read a score; the report behind
``curvkit influence`` (JSON, Markdown, ``self_influence.png``, ``top_examples.png`` for images)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..model.data import Batches
from .base import check_damping

SCHEMA_VERSION = "curvkit.influence/1"
METHODS = ("ekfac", "identity")

HOW_TO_READ = """\
`score(q, i) = grad_q^T (H + damping I)^-1 grad_i`, with `grad_i` the gradient of training example
`i`'s loss, `grad_q` that of the query's loss and `H` the curvature of the mean training loss
(the identity for `identity`).

- **Sign.** `score > 0`: upweighting training example `i` *lowers* the query's loss, so `i` is
  **helpful**; `score < 0`: upweighting it raises the query's loss, so `i` is **harmful** (removing
  it would help).
- **Size.** Removing `i` from the `N` training examples changes the query's loss by about
  `+score / N` (a first-order estimate; compare scores within one report, as they scale with the
  damping and the curvature).
- **Self-influence** `score(i, i) >= 0` is large for examples the model can only fit by memorising
  them: mislabels and outliers. Inspect the training set in decreasing self-influence.
"""


@dataclass
class InfluenceReport:
    """What :func:`influence_report` returns; every section is plain JSON-able data.

    ``settings`` (method, damping, k, sizes), ``description``, ``queries`` (per query: its target
    and, for ``helpful`` and ``harmful``, the training indices with their scores and labels),
    ``self_influence`` (summary and the most self-influential examples), ``mislabels`` (the
    fraction of known flipped labels in the top 10% / 20% by self-influence; None without them),
    ``cost`` (seconds).
    """

    settings: dict
    description: str
    queries: list
    self_influence: dict
    mislabels: dict | None
    cost: dict
    self_influence_values: list = field(default_factory=list, repr=False)
    _images: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON document (``self_influence.values`` holds every training example's score). Free."""
        d = {"schema": SCHEMA_VERSION, "settings": self.settings, "description": self.description,
             "queries": self.queries, "self_influence": dict(self.self_influence, values=self.self_influence_values),
             "mislabels": self.mislabels, "cost": self.cost}
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A human summary: settings, mislabel detection, the self-influence top, per query its
        helpful and harmful examples, and "How to read a score". Free."""
        s = self.settings
        lines = ["# Influence report", "", self.description, "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s.items()]
        if self.mislabels is not None:
            m = self.mislabels
            lines += ["", "## Mislabel detection", "",
                      f"{m['flipped']} of {s['n_train']} training labels were flipped. Inspecting the training set "
                      "in decreasing self-influence finds:", "",
                      "| inspected | flipped labels found | random inspection |", "|---|---|---|",
                      f"| top 10% | {m['found_top_10pct']:.1%} | 10% |",
                      f"| top 20% | {m['found_top_20pct']:.1%} | 20% |"]
        si = self.self_influence
        lines += ["", "## Self-influence", "",
                  f"Over {s['n_train']} training examples: median {si['median']:.4g}, mean {si['mean']:.4g}, "
                  f"max {si['max']:.4g}. The most self-influential (mislabel candidates):", "",
                  "| rank | training index | label | self-influence | flipped |", "|---|---|---|---|---|"]
        for r, e in enumerate(si["top"], 1):
            flipped = "" if e.get("flipped") is None else ("yes" if e["flipped"] else "no")
            lines.append(f"| {r} | {e['index']} | {_fmt(e.get('label'))} | {e['score']:.4g} | {flipped} |")
        lines += ["", f"## Queries (top {s['k']} helpful and harmful training examples)", ""]
        for q in self.queries:
            lines += [f"### Query {q['index']} (target {_fmt(q.get('target'))})", "",
                      "| rank | helpful: index | label | score | harmful: index | label | score |",
                      "|---|---|---|---|---|---|---|"]
            for r, (h, b) in enumerate(zip(q["helpful"], q["harmful"]), 1):
                lines.append(f"| {r} | {h['index']} | {_fmt(h.get('label'))} | {h['score']:.4g} | "
                             f"{b['index']} | {_fmt(b.get('label'))} | {b['score']:.4g} |")
            lines.append("")
        lines += ["## How to read a score", "", HOW_TO_READ]
        return "\n".join(lines)

    def save(self, directory: str | Path) -> list[Path]:
        """Write influence.json, influence.md, self_influence.png and, for image data,
        top_examples.png into ``directory``; returns their paths. Free (needs matplotlib)."""
        from . import plots

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "influence.json").write_text(self.to_json() + "\n")
        (d / "influence.md").write_text(self.to_markdown())
        paths = [d / "influence.json", d / "influence.md", plots.plot_self_influence(self, d / "self_influence.png")]
        if self._images is not None:
            paths.append(plots.plot_top_examples(self, d / "top_examples.png"))
        return paths


def _fmt(v: Any) -> str:
    return "" if v is None else str(v)


def _concat(data: Any) -> tuple[Any, Tensor]:
    xs, ys = [], []
    for _, x, y in Batches(data):
        xs.append(x)
        ys.append(y)
    x = torch.cat(xs) if all(isinstance(t, Tensor) for t in xs) else None
    return x, torch.cat(ys)


def _labels(y: Tensor) -> list | None:
    """Integer class labels, one per example, or None (regression, multi-dimensional targets)."""
    if y.ndim == 1 and not y.is_floating_point() and not y.is_complex():
        return [int(v) for v in y]
    return None


def _is_image(x: Any) -> bool:
    return isinstance(x, Tensor) and (x.ndim == 3 or (x.ndim == 4 and x.shape[1] in (1, 3)))


def influence_report(model: nn.Module, loss_fn: Any, train_data: Any, query_data: Any, *, method: str = "ekfac",
                     damping: float = 1e-3, k: int = 5, flipped: Sequence[int] | Tensor | None = None,
                     top_self: int = 20, description: str = "", settings: dict | None = None) -> InfluenceReport:
    """Fit ``method`` (``"ekfac"`` or ``"identity"``) on ``train_data`` and report, for each query
    of ``query_data``, its ``k`` most helpful and harmful training examples, and the training set's
    self-influence. ``flipped``: the training indices whose labels are known to be wrong; the
    report then gives the fraction of them among the top 10% and 20% by self-influence.

    Training indices are positions in ``train_data``'s iteration order (pass it unshuffled).

    Cost: the estimator's fit (EK-FAC: two passes over the training data), then one pass of
    per-example gradients per query batch and one for the self-influence.
    Memory: a ``(n_query batch, n_train)`` block of scores at a time.
    """
    from . import EKFAC, Identity

    if method not in METHODS:
        raise ArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    damping = check_damping(damping)
    t0 = time.perf_counter()
    if method == "ekfac":
        inf = EKFAC(model, loss_fn, train_data, damping=damping)
    else:
        inf = Identity(model, loss_fn, train_data)
    n_train = inf.n_train
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_train:
        raise ArgumentError(f"k must be an integer in [1, n_train={n_train}], got {k!r}; ask for fewer examples")
    inf.fit()
    t_fit = time.perf_counter()
    top = inf.top(query_data, k)
    t_top = time.perf_counter()
    selfs = inf.self_influence().detach().double().cpu()
    t_self = time.perf_counter()

    x_tr, y_tr = _concat(train_data)
    x_q, y_q = _concat(query_data)
    train_labels, query_labels = _labels(y_tr), _labels(y_q)
    bad = set()
    if flipped is not None:
        bad = {int(i) for i in (flipped.tolist() if isinstance(flipped, Tensor) else flipped)}
        if any(not 0 <= i < n_train for i in bad):
            raise ArgumentError(f"flipped holds indices outside [0, {n_train}); pass training-set positions")

    def entry(i: int, score: float) -> dict:
        e = {"index": i, "score": score}
        if train_labels is not None:
            e["label"] = train_labels[i]
        if flipped is not None:
            e["flipped"] = i in bad
        return e

    queries = []
    for q in range(top.helpful.shape[0]):
        d = {"index": q}
        if query_labels is not None:
            d["target"] = query_labels[q]
        d["helpful"] = [entry(int(i), float(s)) for i, s in zip(top.helpful[q], top.helpful_scores[q])]
        d["harmful"] = [entry(int(i), float(s)) for i, s in zip(top.harmful[q], top.harmful_scores[q])]
        queries.append(d)

    order = selfs.argsort(descending=True)
    summary = {"mean": float(selfs.mean()), "median": float(selfs.median()), "min": float(selfs.min()),
               "max": float(selfs.max()),
               "top": [entry(int(i), float(selfs[i])) for i in order[: min(top_self, n_train)]]}
    mislabels = None
    if flipped is not None:
        def found(frac: float) -> float:
            head = {int(i) for i in order[: math.ceil(frac * n_train)]}
            return len(head & bad) / len(bad) if bad else float("nan")

        mislabels = {"flipped": len(bad), "found_top_10pct": found(0.1), "found_top_20pct": found(0.2),
                     "indices": sorted(bad)}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    st = {"method": method, "damping": damping if method == "ekfac" else 0.0, "k": k, "n_train": n_train,
          "n_query": len(queries), "parameters": params}
    st.update(settings or {})
    cost = {"fit_seconds": t_fit - t0, "top_seconds": t_top - t_fit, "self_influence_seconds": t_self - t_top}
    images = None
    if _is_image(x_tr) and _is_image(x_q) and x_tr.shape[1:] == x_q.shape[1:]:
        images = (x_tr.detach().cpu(), x_q.detach().cpu())
    return InfluenceReport(st, description, queries, summary, mislabels, cost,
                           [float(v) for v in selfs], images)


__all__ = ["InfluenceReport", "influence_report", "HOW_TO_READ", "METHODS"]
