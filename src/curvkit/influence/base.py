r"""The one interface every influence estimator shares, and the score convention.

**Convention.** For a query ``q`` and a training example ``i``,

    score(q, i) = grad_q^T (H + damping I)^{-1} grad_i

with ``grad_i`` the gradient of example ``i``'s own loss (its terms summed, as
:func:`curvkit.per_example_gradients` gives it), ``grad_q`` the gradient of the query's
*measurement* (its loss by default) and ``H`` the curvature of the **mean** training loss
(the GGN, the Hessian, or an approximation of one; the identity for :class:`Identity`).

**Sign.** Adding ``eps * loss_i`` to the mean training loss moves the minimiser by
``-eps (H + damping I)^{-1} grad_i``, so the query's measurement changes by ``-eps * score``:

- ``score > 0``: upweighting example ``i`` *lowers* the query's loss: ``i`` is **helpful**;
- ``score < 0``: upweighting ``i`` raises it: ``i`` is **harmful** (removing it would help);
- removing ``i`` from ``N`` examples changes the query loss by about ``+score / N``.

With a measurement that is not a loss (a margin, a log-probability: higher is better), the
sign flips in meaning: ``score > 0`` then says upweighting ``i`` *lowers* that measurement.

**Self-influence** ``score(i, i) = grad_i^T (H + damping I)^{-1} grad_i >= 0``: large for examples
the model finds surprising and can only fit by memorising them (mislabels, outliers).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ..errors import ArgumentError, DataError, ModelError, ShapeError, TooLargeError
from ..model.data import Batches, map_tensors, split_batch, tensors_of
from ..model.layers import Layer
from ..model.layers import layers as find_layers
from ..model.params import ParamSpec
from ..model.per_example import per_example_gradients
from ..model.risk import Mode, Risk
from .lowrank import LowRankQueries, check_rank

Measurement = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TopResult:
    """The ``k`` most helpful and most harmful training examples of each query, ``(n_query, k)``
    each: indices into the training set (in its iteration order) and their scores (helpful:
    largest first, all the scores in descending order; harmful: most negative first)."""

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def _unsqueeze(x: Any) -> Any:
    """One example of a nest of tensors, given its batch dimension back."""
    return map_tensors(lambda t: t[None], x)


def _shapes(x: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape[1:]), t.dtype) for t in tensors_of(x)]


def check_damping(damping: Any) -> float:
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not 0 <= damping < math.inf:
        raise ArgumentError(f"damping must be a finite number >= 0, got {damping!r} (it is added to the "
                            "curvature's diagonal; 1e-3 times its mean eigenvalue is a usual start)")
    return float(damping)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 16 * 2**30


class Influence:
    r"""Base of the influence estimators: how scores are computed from per-example gradients.

    Subclasses say how ``(H + damping I)^{-1}`` is applied to a block of gradients
    (:meth:`_precondition`) and fit what that needs in :meth:`_fit`.

    Args:
        model, loss_fn, train_data: as for ``ck.hessian``; ``train_data`` one batch or an
            iterable of batches, iterated in the same order on every pass (its order defines the
            training indices of :meth:`scores` and :meth:`top`).
        params: the parameters the gradients are taken over (default: every trainable one).
        damping: added to the curvature's diagonal (``>= 0``).
        measurement: ``fn(outputs, targets) -> (B,)`` the per-example quantity whose change is
            traced; default the example's own loss. E.g. a margin
            ``lambda out, y: out.gather(1, y[:, None])[:, 0] - out.logsumexp(1)``.
        mode, reduction, output, max_batch, distributed: as for ``ck.hessian``.

    Scores are computed per query batch: one pass over the training data per query batch
    (``B_train`` per-example gradients at a time, never all of them at once).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 damping: float = 1e-3, measurement: Measurement | None = None, mode: Mode = "eval",
                 reduction: str | None = None, output: Any = None, max_batch: int | None = None,
                 distributed: bool | None = False):
        self.damping = check_damping(damping)
        if measurement is not None and not callable(measurement):
            raise ArgumentError(f"measurement must be callable as fn(outputs, targets) -> (B,), got "
                                f"{type(measurement).__name__}")
        self.measurement = measurement
        self.risk = Risk(model, loss_fn, train_data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed)
        x, _ = self.risk.batches.first()
        self._input_shapes = _shapes(x)
        self._fitted = False
        self._fit_print: Tensor | None = None

    # properties ------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.risk.model

    @property
    def n_train(self) -> int:
        return self.risk.batches.num_data

    @property
    def dim(self) -> int:
        """The number of parameters the gradients have."""
        return self.risk.space.dim

    def _options(self) -> dict:
        r = self.risk
        return dict(mode=r.mode, reduction=r.reduction, output=r.output, max_batch=r.max_batch,
                    distributed=r.group is not None)

    # fitting ---------------------------------------------------------------------------
    def fit(self) -> "Influence":
        """Fit what the estimator needs (curvature factors, a dense inverse, ...); returns ``self``.
        Remembers a checksum of the parameters: scoring after they changed is refused."""
        self._fit()
        self._fit_print = self._param_print()
        self._fitted = True
        return self

    def _fit(self) -> None:
        """Hook for subclasses."""

    def _precondition(self, Q: Tensor) -> Tensor:
        """``(k, n)`` rows ``g`` -> rows ``((H + damping I)^{-1} g)``."""
        raise NotImplementedError

    def _param_print(self) -> Tensor:
        with torch.no_grad():
            return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                for p in self.risk.space.tensors]).cpu()

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ModelError(f"{type(self).__name__} is not fitted: call .fit() before scoring")
        if not torch.equal(self._param_print(), self._fit_print):
            raise ModelError(f"the model's parameters changed since {type(self).__name__}.fit(); "
                             "call .fit() again to score the current weights")

    def _stages(self) -> Iterator[float]:
        """The weight states scores are summed over, with their weights (one: the current)."""
        yield 1.0

    # gradients -------------------------------------------------------------------------
    def train_batches(self) -> Iterator[tuple[int, Tensor]]:
        """``(first index, (B, n) per-example loss gradients)`` for each training (micro-)batch,
        from :func:`curvkit.per_example_gradients`; refuses training data that changed since the
        constructor (a checksum of every batch, :class:`curvkit.model.Batches`)."""
        r = self.risk
        for start, x, y in self._train_data():
            yield start, per_example_gradients(r.model, r.spec, (x, y), r.space.names, mode=r.mode,
                                               reduction=r.reduction, output=r.output, max_batch=r.max_batch)

    def _train_data(self) -> Iterator[tuple[int, Any, Tensor]]:
        """``(first index, inputs, targets)`` per training batch, refusing changed data."""
        start = 0
        try:
            for _, x, y in self.risk.batches:
                yield start, x, y
                start += int(y.shape[0])
        except DataError as e:
            raise DataError(f"the training data changed since {type(self).__name__} was built: {e}. "
                            "Training indices would not mean the same examples; pass the same batches in "
                            "the same order (no shuffling, no random augmentation) or build a new estimator") from e

    def query_gradients(self, query_data: Any) -> Iterator[Tensor]:
        """``(B, n)`` gradients of the measurement, one block per query batch."""
        for x, y in self._query_batches(query_data):
            yield self._measure_gradients(x, y)

    def _query_batches(self, query_data: Any) -> list[tuple[Any, Tensor]]:
        batches = Batches(query_data)
        out = []
        for _, x, y in batches:
            got = _shapes(x)
            if got != self._input_shapes:
                raise ShapeError(
                    f"query inputs have per-example shapes/dtypes {got} but the training inputs "
                    f"{self._input_shapes}; pass queries shaped like one training example (batch first)")
            out.append((x, y))
        return out

    def _measure_gradients(self, x: Any, y: Tensor) -> Tensor:
        r = self.risk
        if self.measurement is None:
            return per_example_gradients(r.model, r.spec, (x, y), r.space.names, mode=r.mode,
                                         reduction=r.reduction, output=r.output, max_batch=r.max_batch)
        f, space, fn = r.function(), r.space, self.measurement

        def one(params: dict[str, Tensor], xi: Any, yi: Tensor) -> Tensor:
            m = fn(f(params, _unsqueeze(xi)), yi[None])
            return m.reshape(-1).sum()

        g = vmap(grad(one), in_dims=(None, 0, 0))
        rows = []
        with r.in_mode():
            pieces = split_batch(x, y, r.max_batch) if r.max_batch else [(x, y)]
            for xs, ys in pieces:
                gs = g(space.detached(), xs, ys)
                rows.append(torch.cat([gs[n].reshape(ys.shape[0], -1) for n in space.names], dim=1))
        return torch.cat(rows)

    # scores ----------------------------------------------------------------------------
    def _score_blocks(self, query_data: Any, query_rank: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(first row, (b, n_train) scores)`` per query batch: one training pass per batch and stage."""
        self._check_fitted()
        query_rank = check_rank(query_rank)
        queries = self._query_batches(query_data)
        row = 0
        for x, y in queries:
            S = None
            for w in self._stages():
                P = self._precondition(self._measure_gradients(x, y)) * w
                if query_rank is None:
                    part = torch.cat([P @ G.to(P.dtype).T for _, G in self.train_batches()], dim=1)
                else:
                    low = LowRankQueries(P, self._low_rank_layers(), self.risk, query_rank)
                    part = torch.cat([low.scores(xt, yt) for _, xt, yt in self._train_data()], dim=1)
                S = part if S is None else S + part
            yield row, S
            row += S.shape[0]

    def _low_rank_layers(self) -> list[Layer]:
        """The layers whose query gradients ``query_rank`` truncates: every Kronecker one (untied)."""
        return [la for la in find_layers(self.model, self.risk.space.named) if la.kron_reason() is None]

    def scores(self, query_data: Any, *, out: str | os.PathLike | None = None,
               max_bytes: int | None = None, query_rank: int | None = None) -> Tensor | np.ndarray:
        """The ``(n_query, n_train)`` influence matrix (see the module docstring for the sign).

        ``query_data``: one ``(inputs, targets)`` batch or an iterable of them (each batch is a
        row block). ``out``: a path; the matrix is then written to a ``.npy`` file in row blocks
        through a numpy memmap (returned, read-only), never held in memory. Without ``out``, a
        matrix over ``max_bytes`` (default: half the machine's memory) raises
        :class:`~curvkit.errors.TooLargeError` that says to stream it.

        ``query_rank``: truncate each Linear/Conv2d layer's block ``(out, cols)`` of every
        preconditioned query gradient to its rank-``query_rank`` SVD (:mod:`.lowrank`), so a
        query-example pair costs ``T r (out + cols)`` per layer (``T`` rows per example) instead
        of ``out * cols`` and the training side never forms per-example gradients of those
        layers; ``None`` (default): exact. A rank ``>= min(out, cols)`` gives the exact scores.

        Cost: per query batch, its measurement gradients, one preconditioning, and one pass over
        the training data computing per-example gradients (per checkpoint for TracIn); with
        ``query_rank`` one SVD per query and layer, and per training batch one forward and
        backward with layer hooks (plus per-example gradients of the non-matrix parameters).
        Memory: one query batch's ``b x n_train`` block plus ``b x n`` and ``B_train x n`` gradients.
        """
        query_rank = check_rank(query_rank)
        queries = self._query_batches(query_data)
        nq = sum(int(y.shape[0]) for _, y in queries)
        dtype = self.risk.space.dtype
        size = nq * self.n_train * torch.empty(0, dtype=dtype).element_size()
        limit = _memory_bytes() // 2 if max_bytes is None else max_bytes
        if out is None and size > limit:
            raise TooLargeError(
                f"the score matrix ({nq} queries x {self.n_train} training examples, {size / 2**30:.2f} GiB) "
                f"exceeds max_bytes={limit}; stream it to disk with scores(query_data, out='scores.npy') "
                "(a numpy memmap written in row blocks), or score fewer queries at a time")
        if out is None:
            S = torch.empty(nq, self.n_train, dtype=dtype, device=self.risk.space.device)
            for r0, block in self._score_blocks(queries, query_rank):
                S[r0 : r0 + block.shape[0]] = block
            return S
        npdt = {torch.float64: np.float64, torch.float16: np.float32, torch.bfloat16: np.float32}.get(dtype, np.float32)
        mm = np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=npdt, shape=(nq, self.n_train))
        for r0, block in self._score_blocks(queries, query_rank):
            mm[r0 : r0 + block.shape[0]] = block.detach().cpu().to(torch.float64).numpy()
        mm.flush()
        del mm
        return np.load(os.fspath(out), mmap_mode="r")

    def self_influence(self) -> Tensor:
        """``(n_train,)``: ``grad_i^T (H + damping I)^{-1} grad_i`` for every training example
        (summed over checkpoints for TracIn). Rank by it to find mislabeled or atypical examples.
        Cost: one pass over the training data per stage, one preconditioning per batch."""
        self._check_fitted()
        total = None
        for w in self._stages():
            vals = []
            for _, G in self.train_batches():
                vals.append((self._precondition(G) * G.to(self._work_dtype())).sum(1) * w)
            v = torch.cat(vals)
            total = v if total is None else total + v
        return total

    def _work_dtype(self) -> torch.dtype:
        dt = self.risk.space.dtype
        return dt if dt in (torch.float32, torch.float64) else torch.float32

    def top(self, query_data: Any, k: int = 10, *, query_rank: int | None = None) -> TopResult:
        """The ``k`` most helpful (largest scores) and most harmful (most negative) training
        examples of each query (``query_rank`` as for :meth:`scores`). Cost: as :meth:`scores`,
        holding one row block at a time."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_train:
            raise ArgumentError(f"k must be an integer in [1, n_train={self.n_train}], got {k!r}")
        query_rank = check_rank(query_rank)
        parts = [[], [], [], []]
        for _, S in self._score_blocks(query_data, query_rank):
            hv, hi = S.topk(k, dim=1)
            bv, bi = (-S).topk(k, dim=1)
            for lst, t in zip(parts, (hi, hv, bi, -bv)):
                lst.append(t)
        return TopResult(*(torch.cat(p) for p in parts))


__all__ = ["Influence", "TopResult", "Measurement", "check_damping"]
