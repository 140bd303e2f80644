"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

import contextlib
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jvp, vmap

from ..errors import ArgumentError
from ..model.data import split_batch, tensors_of
from ..model.kernels import OutOfMemory
from ..model.params import ParamSpec
from ..model.risk import Mode
from ._graphs import GraphCache
from ._retain import SHARE, Graph, Kept, SavedBytes, Stale, drew, free_memory, rng_states, versions
from .base import CurvatureOperator, transform_failed

Method = Literal["auto", "forward-over-reverse", "double-backward"]
# a product whose memory, scaled from the slice to the whole batch, passes this share of the device
# is memory-bound: forward-over-reverse's shared forward no longer pays for its tangents (85M GPT,
# 10 probes: 16.6 s and 108 GiB against double backward's 15.5 s and 31 GiB, BENCHMARKS.md)
LARGE = 0.25
# method="auto"'s choices, per model, for every later operator of the process with the same
# parameters, batch shape, probe count and context (a model that goes away takes its entries)
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HessianOperator(CurvatureOperator):
    r"""``H = d^2 L / d theta^2`` of the loss ``L`` over all the data.

    Products are Hessian-vector products, by forward-over-reverse differentiation
    (``jvp`` of ``grad``, ``torch.func``) vmapped over the k probes, so the forward and backward
    pass that all probes share run once, or by double backward (``autograd.grad`` of the
    gradient, one backward per probe). ``method="auto"``: double backward on the CPU; on CUDA it
    measures both on a quarter of the first batch of the first product (time and peak memory)
    and keeps the faster, or the one that needs less memory when they are within 10% of each
    other, and double backward wherever a product's memory would pass a quarter of the device
    (large models, where double backward needs about 0.6x the memory): :attr:`choice` holds the
    measurement and :attr:`strategy` says which runs. The choice is remembered for the process: a
    later operator of the same model, parameters, batch shape and probe count takes it without
    measuring (``choice["cached"]``). Models that ``vmap`` cannot batch fall back to one probe at
    a time, and models without forward-mode derivatives to double backward; every path gives the
    same matrix. ``method`` forces one.

    Inside :meth:`retaining` (which every algorithm of :mod:`curvkit.linalg` enters for its run),
    double-backward products keep each batch's gradient graph from the first product and
    differentiate it again for every later one: those cost one backward through the graph
    instead of a forward and two backwards (about 2 gradients instead of 3-4 on a transformer),
    at the memory of the kept graphs (``retain_graphs``).

    Cost of ``H @ V`` with V (n, k): one pass over the data, each batch a forward, a backward
    and their k tangent passes (about 2-4 gradients for k = 1; see BENCHMARKS.md).

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = ck.hessian(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> H.shape
        (8, 8)
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 method: Method = "auto", mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, distributed: bool | None = None, cuda_graphs: bool | None = None,
                 retain_graphs: bool | int = True):
        if method not in ("auto", "forward-over-reverse", "double-backward"):
            raise ArgumentError(f"method must be 'auto', 'forward-over-reverse' or 'double-backward', got {method!r}")
        if not (isinstance(retain_graphs, bool) or (isinstance(retain_graphs, int) and retain_graphs >= 0)):
            raise ArgumentError(f"retain_graphs must be True, False or a number of bytes >= 0, got {retain_graphs!r}")
        self.method = method
        self.retain_graphs = retain_graphs
        self._kept: Kept | None = None  # the gradient graphs kept inside retaining()
        self._piece: tuple[int, int] = (-1, 0)  # (batch key, piece) of the last batch product in a pass
        self.strategy = "double-backward" if method == "double-backward" else "vmap"
        self.choice: dict | None = None  # what method="auto" measured, once
        super().__init__(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs)

    def _options(self) -> dict:
        chosen = {"double-backward": "double-backward", "vmap": "forward-over-reverse"}.get(self.strategy)
        method = chosen if self.choice is not None and chosen else self.method  # blocks reuse the choice
        return {**super()._options(), "method": method, "retain_graphs": self.retain_graphs}

    @contextlib.contextmanager
    def retaining(self) -> Iterator[None]:
        """Keep each batch's gradient graph between the double-backward products made inside:
        a later product of the same batch differentiates the kept graph again (one backward)
        instead of recomputing the forward and the first backward.

        Memory: the kept graphs (a batch's activations and the first backward's intermediates,
        for each batch kept), within ``retain_graphs``:

        - ``True``: 80% of the device memory free on entry on CUDA, a quarter of the available host
          memory on the CPU (within the container's memory limit), and all or none: the graphs are
          kept only if every batch's fits, judged from the first (a partial keep adds the fresh
          products' working memory to the kept graphs for a fraction of the saving);
        - a number of bytes: as many graphs as fit, the other batches recomputed;
        - ``False`` or 0: nothing is kept.

        Freed on exit. A graph is used again only while the model's parameters and buffers (and the loss's
        weights) are unchanged and the batch holds the same values; out of memory, every kept graph
        is freed and the product recomputed. A forward that draws from torch's random streams is not
        kept (each product draws its own sample, as outside). Nested contexts share the outer one's
        graphs. Products by forward-over-reverse, or replayed from a CUDA graph, are unaffected."""
        if self._kept is not None or self.retain_graphs is False:
            yield
            return
        share = SHARE["cuda" if self.device.type == "cuda" else "cpu"]
        budget = share * free_memory(self.device) if self.retain_graphs is True else float(self.retain_graphs)
        self._kept = Kept(budget, self.risk.batches.num_data if self.retain_graphs is True else None)
        try:
            yield
        finally:
            self._kept.clear()
            self._kept = None

    def _matmat(self, V: Tensor) -> Tensor:
        if self.method == "auto" and self.choice is None:
            self._choose(V)
        self._piece = (-1, 0)  # a new pass: pieces are counted from its first batch
        return super()._matmat(V)

    def _choose(self, V: Tensor) -> None:
        """Pick the product method (see the class docstring). On the CPU, double backward: it has no
        transform overhead and was faster on every model measured (BENCHMARKS.md), and a fixed
        choice keeps same-seed results bit-identical. On CUDA, run both on a slice of the first
        batch (a quarter of it), timed, with their peak memory, and keep the better (double
        backward is timed on one probe and scaled by the k probes: it runs one backward per
        probe; inside :meth:`retaining` at what its later products cost, re-differentiating kept
        graphs where they fit: :meth:`_kept_seconds`). Forward-over-reverse is timed as it will run: replayed from a CUDA graph where
        graphs are on (for small models the graph is most of its speed), captured for the slice
        and freed after. Double backward is kept where either method's peak memory, scaled
        linearly from the slice to the batch, passes :data:`LARGE` (a quarter) of the device's
        memory: those products are memory-bound, and forward-over-reverse's tangents cost more
        than its shared forward saves (and a slice that small under-states that). An
        out-of-memory error in forward-over-reverse decides for double backward too. Cost on
        CUDA: about one batch product, once."""
        if self.device.type != "cuda":
            self.strategy = "double-backward"
            self.choice = {"chosen": "double-backward", "why": "the CPU: no transform overhead"}
            return
        first = next(iter(self.risk.pieces()))  # read once: a DataLoader loads a batch for it
        key = self._choice_key(V, first)
        known = _CHOICES.get(self.model, {}).get(key)
        if known is not None:  # measured for an operator of this model and batch shape before
            self.strategy, self.choice = known[0], {**known[1], "cached": True}
            if self.strategy == "double-backward":
                self._graphs = None
            return
        self._measure_choice(V, first)
        _CHOICES.setdefault(self.model, {})[key] = (self.strategy, dict(self.choice))

    def _choice_key(self, V: Tensor, first: tuple[int, Any, Tensor]) -> tuple:
        """What the choice depends on: the parameters' shapes and dtypes, the device, the first
        batch's shapes, the probes, the mode and loss, the kernels in use, CUDA graphs on or off and
        whether products keep graphs (and may keep them all)."""
        _, x, y = first
        shapes = tuple((t.shape, t.dtype) for t in tensors_of(x))
        kept = None if self._kept is None else self._kept.budget > 0
        return (tuple(self.param_names), tuple(self.space.shapes), self.dtype, str(self.device), shapes,
                (y.shape, y.dtype), V.shape[1], self.risk.mode, type(self.risk.spec).__name__,
                frozenset(self.risk.safe_kernels), self._graphs is not None, kept, self.risk.max_batch)

    def _measure_choice(self, V: Tensor, first: tuple[int, Any, Tensor]) -> None:
        """:meth:`_choose`'s measurement on CUDA (the first operator of a model and batch shape) on
        the data's first piece ``first``."""
        i, x, y = first
        size = int(y.shape[0])
        (xw, yw), (xs, ys) = (split_batch(x, y, n)[0] for n in (min(size, 2), max(min(size, 2), size // 4)))
        probes = self.space.probes(V)
        one = [p[:1] for p in probes]

        def measure(fn, batch_x, batch_y, halve: bool = True) -> dict:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            # fused kernels switch to differentiable ones; out of memory, double backward halves the
            # batch as a pass would, while forward-over-reverse loses
            self.risk._fit(fn, batch_x, batch_y, i, i, halve=halve)
            torch.cuda.synchronize()
            return {"seconds": time.perf_counter() - t0, "peak_bytes": torch.cuda.max_memory_allocated() - base,
                    "examples": int(batch_y.shape[0])}

        def keep_double_backward(why: str | None = None, **measured) -> None:
            self.strategy, self._graphs = "double-backward", None  # the other's graphs go with their memory
            self.choice = {**measured, "chosen": "double-backward", **({"why": why} if why else {})}

        dbl_fn = lambda x_, y_, k_: self._double_backward(x_, y_, one)  # noqa: E731
        # forward-over-reverse as it will run: replayed from a CUDA graph (captured for the slice on
        # a cache of its own, freed after) where graphs are on, eagerly after a warm-up otherwise
        graphs = GraphCache(max_graphs=1) if self._graphs is not None else None
        if graphs is not None:
            tensors = self.space.tensors
            fwd_fn = lambda x_, y_, k_: graphs(self._weighted, x_, y_, probes, k_, tensors)  # noqa: E731
        else:
            fwd_fn = lambda x_, y_, k_: self._weighted(x_, y_, probes, k_)  # noqa: E731
        big = LARGE * torch.cuda.get_device_properties(self.device).total_memory
        with self.risk.in_mode():
            measure(dbl_fn, xw, yw)  # warm-up: first-call costs (kernel choice, workspaces) out of the timing
            dbl = measure(dbl_fn, xs, ys)
            dbl["seconds"] *= V.shape[1]
            if self._kept is not None and self._kept.budget > 0:  # inside retaining(): later products reuse graphs
                try:
                    dbl["seconds_kept"] = self._kept_seconds(xs, ys, one) * V.shape[1]
                except OutOfMemory:  # the slice's graph does not fit to be kept (the loop cut it): as outside
                    torch.cuda.empty_cache()
            if dbl["peak_bytes"] * size / dbl["examples"] > big:  # forward-over-reverse needs more still
                return keep_double_backward(f"double backward alone needs over {LARGE:.0%} of the device's memory",
                                            **{"double-backward": dbl})
            try:
                first = measure(fwd_fn, *((xs, ys) if graphs is not None else (xw, yw)), halve=False)
                fwd = None
                if self.strategy != "double-backward":  # the faster of two runs: one ~0.1 s timing is noisy
                    fwd = min((measure(fwd_fn, xs, ys, halve=False) for _ in range(2)), key=lambda m: m["seconds"])
                if fwd is not None and graphs is not None:  # the capture's memory is the graph's to keep
                    fwd["peak_bytes"] = max(fwd["peak_bytes"], first["peak_bytes"])
            except OutOfMemory:
                del graphs
                torch.cuda.empty_cache()
                return keep_double_backward("forward-over-reverse ran out of memory on a slice of the first batch",
                                            **{"double-backward": dbl})
            del graphs
            gc.collect()  # the slice graph's pool is freed only with its last reference (cycles included)
        if self.strategy == "double-backward":  # the transform could not run this model: nothing to choose
            return keep_double_backward("forward-over-reverse cannot run this model")
        t_f, t_d = fwd["seconds"], dbl.get("seconds_kept", dbl["seconds"])
        measured = {"forward-over-reverse": fwd, "double-backward": dbl}
        if (t_d < 0.9 * t_f or (t_d <= 1.1 * t_f and dbl["peak_bytes"] < fwd["peak_bytes"])
                or fwd["peak_bytes"] * size / fwd["examples"] > big):
            return keep_double_backward(**measured)
        self.choice = {**measured, "chosen": "forward-over-reverse"}

    def _kept_seconds(self, x: Any, y: Tensor, V: list[Tensor]) -> float:
        """What a double-backward product of the slice ``(x, y)`` costs inside :meth:`retaining`
        once graphs are kept: re-differentiating a kept graph (the faster of two runs) for the
        examples whose graphs fit in the budget (the slice's graph memory per example; all or none
        for ``retain_graphs=True``), a whole product for the rest. Cost: one slice product and two
        more backwards."""
        t0 = time.perf_counter()
        g = self._gradient_graph(x, y, None, count=True)
        torch.cuda.synchronize()
        t_graph = time.perf_counter() - t0
        t_again = float("inf")
        for last in (False, True):
            t0 = time.perf_counter()
            self._differentiate(g, V, keep=not last)
            torch.cuda.synchronize()
            t_again = min(t_again, time.perf_counter() - t0)
        share = min(1.0, self._kept.projected(g.nbytes / max(int(y.shape[0]), 1)) / self.risk.batches.num_data)
        return t_again + t_graph * (1 - share)

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor, Any]:
        names, k, risk = self.param_names, V[0].shape[0], self.risk
        if self.strategy != "double-backward":
            f, params = risk.function(), self.space.detached()

            def loss_and_weight(q):
                out = f(q, x)
                w = risk.weight(out, y)  # (transforms return tensors only)
                return risk.loss(out, y), (w if isinstance(w, Tensor) else torch.tensor(float(w)))

            def hvp(v):
                _, hv, (loss, w) = jvp(grad_and_value(loss_and_weight, has_aux=True), (params,), (v,), has_aux=True)
                return hv, loss, w

            probes = dict(zip(names, V))
            if self.strategy == "vmap":
                try:
                    hv, loss, w = vmap(hvp, randomness="same")(probes)
                    return [hv[n] for n in names], loss[0], w[0] if isinstance(w, Tensor) else w
                except (RuntimeError, NotImplementedError) as e:
                    if not transform_failed(e):
                        raise
                    self.strategy = "loop"
            if self.strategy == "loop":
                try:
                    outs = [hvp({n: v[j] for n, v in probes.items()}) for j in range(k)]
                    return [torch.stack([o[0][n] for o in outs]) for n in names], outs[0][1], outs[0][2]
                except (RuntimeError, NotImplementedError) as e:
                    if not transform_failed(e):
                        raise
                    if self.method == "forward-over-reverse":
                        raise
                    self.strategy = "double-backward"
        last, piece = self._piece
        self._piece = (index, piece + 1 if index == last else 0)
        key = None if self._kept is None or self._graphs is not None else self._piece
        try:
            return self._double_backward(x, y, V, key)
        except BaseException:
            # the data loop redoes a failed call (in halves out of memory, or on differentiable
            # kernels): it was no piece, or what it redoes is kept one key late
            self._piece = (last, piece)
            raise

    def _double_backward(self, x: Any, y: Tensor, V: list[Tensor], key: tuple | None = None
                         ) -> tuple[list[Tensor], Tensor, Any]:
        """The batch's Hessian times the k probes: one backward per probe through the gradient's
        graph. ``key`` (inside :meth:`retaining`): the batch piece whose graph may be kept or
        reused."""
        kept = self._kept if key is not None else None
        if kept is None:
            return self._differentiate(self._gradient_graph(x, y, None, count=False), V, keep=False)
        state = versions([*self.model.parameters(), *self.model.buffers(), *self._loss_tensors()])
        try:
            g = kept.take(key, x, y, state)
            fresh = g is None
            if fresh:
                g = self._gradient_graph(x, y, state, count=True)
            keep = not fresh or (kept.fits(g.nbytes, int(y.shape[0])) and not g.random)
            out = self._differentiate(g, V, keep)
        except Stale:
            if fresh:  # the model writes a tensor its own backward needs: refused, as without hooks
                raise
            g = None
            kept.drop(key)  # a tensor the kept graph saved was written since (not one the state sees)
            return self._double_backward(x, y, V, key)
        except OutOfMemory:
            if not kept.graphs:
                raise
            out = None  # the kept graphs took the room this product needs: free them, keep no more
            g = None  # this one too (kept, or made for this product)
        if out is None:
            kept.clear()
            kept.budget = 0
            torch.cuda.empty_cache()
            return self._differentiate(self._gradient_graph(x, y, None, count=False), V, keep=False)
        if fresh and keep:
            kept.keep(key, g)
        return out

    def _loss_tensors(self) -> list[Tensor]:
        """The tensors the loss reads besides the model's (class weights, ``pos_weight``): the spec's
        and those of a loss module."""
        spec = self.risk.spec
        found = [t for t in getattr(spec, "__dict__", {}).values() if isinstance(t, Tensor)]
        for m in (self.risk.loss_fn, getattr(spec, "fn", None)):
            if isinstance(m, nn.Module):
                found += [*m.parameters(), *m.buffers()]
        return found

    def _differentiate(self, g: Graph, V: list[Tensor], keep: bool) -> tuple[list[Tensor], Tensor, Any]:
        """``H V`` of the batch of ``g``: one backward through its graph per probe; ``keep``: leave
        the graph for later products."""
        k = V[0].shape[0]
        rows: list[list[Tensor]] = [[torch.zeros_like(v[0]) for v in V] for _ in range(k)]
        with torch.enable_grad():
            for j in range(k):
                if not g.live:
                    break
                hv = torch.autograd.grad([g.grads[i] for i in g.live], g.params, [V[i][j] for i in g.live],
                                         retain_graph=keep or j < k - 1, allow_unused=True)
                rows[j] = [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, g.params)]
        return [torch.stack([r[i] for r in rows]) for i in range(len(V))], g.loss, g.weight

    def _gradient_graph(self, x: Any, y: Tensor, state: tuple | None, count: bool) -> Graph:
        """A forward and a backward that records its graph (``create_graph``); ``count``: measure
        the memory the graph holds (to decide whether it can be kept)."""
        params = {n: p.requires_grad_(True) for n, p in self.space.detached().items()}
        plist = list(params.values())
        saved = SavedBytes([*self.model.parameters(), *self.model.buffers()]) if count else contextlib.nullcontext()
        rng = rng_states(self.device) if count else None
        with torch.enable_grad(), saved:
            out = self.risk.function()(params, x)
            loss = self.risk.loss(out, y)
            # parameters the loss does not reach (an unused module) or reaches linearly have a zero
            # gradient or a gradient without a graph: their rows of H are zero
            grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        nbytes = saved.nbytes + sum(g.untyped_storage().nbytes() for g in grads if g is not None) if count else 0
        random = rng is not None and drew(rng, self.device)
        return Graph(x, y, state, grads, plist, live, loss.detach(), self.risk.weight(out, y), nbytes, random=random)


def hessian(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, method: Method = "auto",
            mode: Mode = "eval", reduction: str | None = None, output: Any = None, max_batch: int | None = None,
            distributed: bool | None = None, cuda_graphs: bool | None = None,
            retain_graphs: bool | int = True) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` over ``data`` as a matrix-free operator.

    Cost to build: one pass over the data's batches without the model (to count and check
    them) and one forward on the first batch (to check the loss). See :class:`HessianOperator`
    for the product's cost and :class:`~curvkit.operators.base.CurvatureOperator` for the options.
    """
    return HessianOperator(model, loss_fn, data, params, method=method, mode=mode, reduction=reduction,
                           output=output, max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs,
                           retain_graphs=retain_graphs)
