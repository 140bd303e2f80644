r"""The one data loop: the loss over all the data, ``L = sum_b w_b L_b / sum_b w_b``.

Every curvature product, the gradient, K-FAC's factors, the report's evaluation and the monitor
pass over the data through :meth:`Risk.accumulate`, which owns, once:

- **weights**: batch ``b`` counts ``w_b`` = its loss terms for a "mean" loss (examples, or the
  tokens that are not ``ignore_index``: :mod:`curvkit.model.losses`), 1 for a "sum" loss, so
  batching the same data differently never changes a result;
- **finiteness**: a NaN/inf loss is reported with the batch it came from, never averaged in;
- **mode**: the model runs in eval mode unless ``mode="train"`` (refused with active dropout);
- **determinism**: every pass must see the same batches (:class:`~curvkit.model.data.Batches`);
- **micro-batching**: ``max_batch=m`` cuts larger batches into pieces of at most ``m`` examples
  (weighted by their own terms, so the result is the same); a CUDA out-of-memory error on a
  batch halves the pieces until they fit, with one warning naming the size that did;
- **distribution**: under ``torch.distributed`` each rank passes its own shard of the data and
  every rank gets the sum over all ranks, from ONE all-reduce per pass (of the weighted sums, the
  weights, the loss and a few checks). Ranks that disagree (parameter counts, the vectors
  multiplied) are refused with a clear message instead of being silently averaged, and an
  error on one rank (a NaN loss, bad data) is raised on every rank instead of leaving the
  others waiting in the all-reduce.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import (ArgumentError, CurvkitError, DataError, FallbackWarning, LossError, ModelError,
                      NonFiniteError, ShapeError, TooLargeError)
from .data import Batches, split_batch, tensors_of
from .kernels import OutOfMemory, differentiable_kernels, fused_op, is_rnn_op
from .losses import LossSpec, loss_spec
from .params import ParamSpace, ParamSpec

Mode = Literal["eval", "train"]
Output = "str | int | Callable[[Any], Tensor] | None"
# (per-batch sums already weighted, the batch's loss, its weight)
BatchFn = Callable[[Any, Tensor, int], tuple[list[Tensor], Tensor, Any]]


@dataclass
class Totals:
    """What one pass over the data returns: the weighted sums (over every batch of every rank),
    the total weight, the number of examples and the loss over all the data."""

    sums: list[Tensor]
    weight: float
    examples: int
    loss: float
    reduction: str

    def mean(self, t: Tensor) -> Tensor:
        """``t / total weight`` for a "mean" loss, ``t`` for a "sum" loss."""
        return t / self.weight if self.reduction == "mean" else t


class Risk:
    """The loss of ``model`` on ``data`` with ``loss_fn``, and the loop over its batches.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is looked through).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar: a torch loss module, a
            function, or a :class:`~curvkit.model.losses.LossSpec`.
        data: one ``(inputs, targets)`` batch or an iterable of them, re-iterated on every pass.
            Inputs that are a dict are passed as keyword arguments (``model(**inputs)``).
        params: the parameters differentiated (:func:`~curvkit.model.params.resolve_params`).
        mode: "eval" (default) or "train" (BatchNorm batch statistics; refused with dropout).
        reduction: what a loss without a ``reduction`` attribute does ("mean" by default).
        output: which part of the model's output the loss sees: a key (``"logits"`` of a
            transformers ``ModelOutput``), an index, or a callable; ``None`` passes it as is.
        max_batch: the most examples one forward/backward sees (larger batches are cut).
        distributed: sum over the ranks of the default process group (``None``: when one is
            initialised with more than one rank; ``False``: never).

    Cost to build: one pass over the batches without the model (to count and check them) and
    one forward on the first batch (to check the loss and learn its terms).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, distributed: bool | None = None,
                 space: ParamSpace | None = None, spec: LossSpec | None = None):
        self.group = _process_group(distributed)
        try:
            self._build(model, loss_fn, data, params, mode, reduction, output, max_batch, space, spec)
        except Exception as e:  # one rank's mistake must stop every rank, not leave them waiting
            if self.group is None:
                raise
            self._agree("parameter count", 0.0, failed=e)
            raise  # pragma: no cover (_agree re-raises e)
        if self.group is not None:
            self._agree("parameter count", float(self.space.dim))

    def _build(self, model, loss_fn, data, params, mode, reduction, output, max_batch, space, spec) -> None:
        if mode not in ("eval", "train"):
            raise ModelError(f"mode must be 'eval' or 'train', got {mode!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise ArgumentError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        if isinstance(loss_fn, type):
            raise LossError(f"loss_fn is the class {loss_fn.__name__}, not a loss; pass an instance: "
                            f"{loss_fn.__name__}()")
        if not callable(loss_fn):
            raise LossError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        model = _unwrap(model)
        self.model, self.loss_fn, self.mode, self.output = model, loss_fn, mode, output
        self.max_batch = max_batch
        self.safe_kernels: set[str] = set()  # fused ops without second derivatives met so far
        self._stream: tuple[int, int, torch.Generator] | None = None  # (seed, key, generator) of this pass
        self.space = space if space is not None else ParamSpace(model, params)
        if mode == "train":
            refuse_active_dropout(model)
        self.batches = data if isinstance(data, Batches) else Batches(data)
        if spec is None:
            out, y, loss = self._validate()
            spec = loss_spec(loss_fn, out, y, reduction)
            empty = spec.reduction == "mean" and isinstance(out, Tensor) and float(spec.weight(out, y)) == 0
            if not math.isfinite(float(loss)) and not empty:  # a batch without terms is 0/0, and counts 0
                raise NonFiniteError(
                    f"the loss is {float(loss)} on batch 0; check the inputs and the model's parameters for NaN/inf"
                )
        self.spec = spec
        self.reduction = spec.reduction

    # the model as a function ------------------------------------------------------------
    def function(self) -> Callable[[dict[str, Tensor], Any], Any]:
        """``f(params, inputs)``: the model's (picked) output as a pure function of the chosen
        parameters; the others and the buffers are the model's current ones."""
        chosen = set(self.space.names)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}
        buffers = dict(self.model.named_buffers())
        train, model, pick = self.mode == "train", self.model, self.pick
        met = set(self.safe_kernels)
        safe = (lambda: differentiable_kernels(rnn=any(is_rnn_op(o) for o in met))) if met else contextlib.nullcontext

        def f(params: dict[str, Tensor], x: Any) -> Any:
            # BatchNorm in train mode updates running stats in place: on fresh copies made inside
            # the function, so the model's stay intact and torch.func transforms (which refuse to
            # mutate a captured tensor) can differentiate it
            bufs = {n: b.clone() for n, b in buffers.items()} if train else buffers
            args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
            with safe():
                return pick(functional_call(model, (params, frozen, bufs), args, kwargs))

        return f

    def pick(self, out: Any) -> Any:
        """The part of the model's output that the loss sees (``output=``)."""
        sel = self.output
        if sel is None:
            return out
        if callable(sel):
            return sel(out)
        try:
            return out[sel]
        except (KeyError, IndexError, TypeError) as e:
            keys = list(out.keys()) if isinstance(out, Mapping) else f"{type(out).__name__}"
            raise ModelError(f"output={sel!r} does not select anything from the model's output ({keys}); "
                             "pass a key or index it has, or a callable") from e

    def loss(self, out: Any, y: Tensor) -> Tensor:
        """The batch loss (the spec computes what ``loss_fn`` computes)."""
        return self.spec(out, y)

    def weight(self, out: Tensor, y: Tensor) -> Tensor | float:
        """A batch's weight: its terms for a "mean" loss, 1 for a "sum"."""
        return self.spec.weight(out, y)

    def in_mode(self) -> contextlib.AbstractContextManager:
        return model_mode(self.model, train=self.mode == "train")

    # the loop ---------------------------------------------------------------------------
    def pieces(self) -> Iterator[tuple[int, Any, Tensor]]:
        """``(batch index, inputs, targets)`` for every micro-batch of one pass (``max_batch``):
        consecutive pieces of a batch share its index, so per-batch random draws continue one
        stream over them (:meth:`batch_generator`)."""
        for i, x, y in self.batches:
            if self.max_batch is not None and y.shape[0] > self.max_batch:
                for xs, ys in split_batch(x, y, self.max_batch):
                    yield i, xs, ys
            else:
                yield i, x, y

    def accumulate(self, fn: BatchFn, check: Tensor | None = None, what: str = "curvature product",
                   shapes: list[tuple[int, ...]] | None = None) -> Totals:
        """One pass over the data: ``sum_b fn(batch b)``.

        ``fn(inputs, targets, index)`` returns ``(sums, loss, weight)``: the batch's contributions
        already multiplied by its weight, its loss and its weight (:meth:`weight`). Returns the
        sums over every batch (and rank), the total weight, the examples and the loss over all the
        data; raises :class:`NonFiniteError` naming the batch of a NaN/inf loss and on NaN/inf
        sums. ``check``: a few numbers that must be equal on every rank (e.g. statistics of the
        vectors multiplied), compared in the same all-reduce. Cost: one pass, each batch one
        call of ``fn``; one all-reduce when distributed; one host sync at the end.

        ``index`` is the batch's key; under ``torch.distributed`` it
        is the batch's place in the round-robin order over ranks, ``i * world + rank`` for batch
        ``i`` of ``rank``, so that per-batch random draws seeded by it (MC Fisher, MC K-FAC) are
        the same as one process on all the data when batch ``j`` is given to rank ``j % world``,
        and differ between ranks however the data is sharded. An error on one rank is raised on every rank (the others
        raise its class, naming that rank). ``shapes``: the shapes of the sums, where the caller
        knows them, so that a rank that fails before its first batch is done can still join the
        all-reduce (without them such an error stays on its rank, and the others wait for it).
        """
        self._stream = None  # a new pass: every batch's draws start from their own seed again
        sums: list[Tensor] | None = None
        losses: list[Tensor] = []  # each batch's loss, for the error that names a bad one
        weighted: list[Tensor] = []
        where: list[int] = []
        weight: Any = 0.0
        examples = 0
        failed: Exception | None = None
        world, rank = (1, 0) if self.group is None else (self.world, dist.get_rank(self.group))
        try:
            with self.in_mode():
                for i, x, y in self.pieces():
                    # the batch's place in the round-robin order over ranks
                    parts, loss, w = self._fit(fn, x, y, i * world + rank, i)
                    loss = loss.detach().reshape(()).to(torch.float64)
                    if isinstance(w, Tensor):  # a batch without terms (all ignore_index): its mean is 0/0,
                        empty = w == 0  # and what it weighs by its terms is NaN * 0; it counts nothing
                        parts = [torch.where(empty & ~torch.isfinite(p), torch.zeros_like(p), p) for p in parts]
                        loss = torch.where(empty, torch.zeros_like(loss), loss)
                    # sums in float32 or better whatever the model's dtype (bf16 cannot count past 256)
                    sums = [p.to(_acc(p.dtype), copy=True) for p in parts] if sums is None else \
                        [s.add_(p) for s, p in zip(sums, parts)]
                    weight = weight + w
                    examples += int(y.shape[0])
                    losses.append(loss)
                    weighted.append(loss * w)
                    where.append(i)
        except Exception as e:
            # the other ranks are (or will be) in the all-reduce: join it to tell them, which needs
            # the sums' sizes, known once a batch is done or from the caller's shapes
            if self.group is None or (sums is None and shapes is None):
                raise
            if sums is None:
                sums = [torch.zeros(sh, dtype=_acc(self.space.dtype), device=self.space.device) for sh in shapes]
            failed = e
        assert sums is not None  # Batches guarantees a batch
        dev = sums[0].device if sums else self.space.device  # a pass may sum nothing but its loss
        loss_t = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64, device=dev)
        bad_local = ~torch.isfinite(loss_t)
        wsum = torch.stack(weighted).nansum() if weighted else torch.zeros((), dtype=torch.float64, device=dev)
        stats = [wsum.reshape(1), torch.as_tensor(weight, dtype=torch.float64, device=loss_t.device).reshape(1),
                 torch.tensor([float(examples)], dtype=torch.float64, device=loss_t.device),
                 bad_local.sum().reshape(1).to(torch.float64)]
        codes = None
        if self.group is not None:
            sums, stats, codes = self._all_reduce(sums, stats, check, failed, bad_local.any())
        loss_sum, total_w, n, bad = (float(s) for s in stats)
        if bad and bool(bad_local.any()):
            j = int(bad_local.nonzero()[0, 0])
            raise NonFiniteError(
                f"the loss is {float(loss_t[j])} on batch {where[j]}"
                f"{self._rank_text()}; the curvature of a non-finite loss is meaningless. Check that "
                "batch's inputs and the model's parameters for NaN/inf"
            )
        if codes is not None:
            self._raise_failures(codes, None, f"during this pass over the data ({what})")
        if not all(bool(torch.isfinite(s).all()) for s in sums):
            raise NonFiniteError(
                f"a {what} is NaN or inf although every loss is finite (overflow in the second "
                "derivatives?); try float64 (model.double()) or check the probes for NaN/inf"
            )
        mean = self.reduction == "mean"
        if mean and total_w == 0:
            raise LossError("the loss has no terms in the data (every target is ignore_index?); there is "
                            "nothing to take the curvature of")
        return Totals(sums, total_w, int(n), loss_sum / total_w if mean else loss_sum, self.reduction)

    def _fit(self, fn: BatchFn, x: Any, y: Tensor, key: int, i: int, halve: bool = True) -> tuple[list[Tensor], Tensor, Any]:
        """``fn`` on one batch; on a CUDA out-of-memory error, on halves of it until they fit
        (then every later batch is cut to that size: ``max_batch``), with a warning, or the error
        itself with ``halve=False`` (a trial that must not change the batch size). A fused kernel
        without the derivatives curvature needs switches the model to differentiable kernels."""
        try:
            return fn(x, y, key)
        except OutOfMemory:
            if not halve:
                raise
        except (RuntimeError, NotImplementedError) as e:
            op = fused_op(e)
            kind = None if op is None else ("rnn" if is_rnn_op(op) else "other")
            if op is None or kind in {"rnn" if is_rnn_op(o) else "other" for o in self.safe_kernels}:
                raise  # not a fused kernel, or one the differentiable kernels already replace
            self.safe_kernels.add(op)  # every later pass too: the same model, the same kernels
            what = ("cuDNN/mkldnn off for the RNNs (native cells)" if kind == "rnn" else
                    "the math attention backend, the MHA/transformer fast path off, embedding_bag as lookup + reduction")
            warnings.warn(
                f"{op} has no second derivative (or no forward-mode AD), which curvature needs; from now on "
                f"this model runs on differentiable kernels ({what}): the same function, at that path's cost",
                FallbackWarning, stacklevel=4,
            )
            return self._fit(fn, x, y, key, i, halve)
        b = int(y.shape[0])
        if b == 1:
            raise TooLargeError(
                f"one example of batch {i} does not fit in device memory for this {type(self).__name__} pass; "
                "use a smaller model, lower precision, or the CPU"
            ) from None
        torch.cuda.empty_cache()
        self.max_batch = max(1, math.ceil(b / 2)) if self.max_batch is None else max(1, min(self.max_batch, b) // 2)
        warnings.warn(
            f"batch {i} ({b} examples) did not fit in device memory; passing the data in micro-batches of "
            f"{self.max_batch} from now on (pass max_batch={self.max_batch} to start there)",
            FallbackWarning, stacklevel=4,
        )
        total: list[Tensor] | None = None
        loss: Any = 0.0
        weight: Any = 0.0
        for xs, ys in split_batch(x, y, self.max_batch):
            parts, l_, w = self._fit(fn, xs, ys, key, i)
            total = [p.to(_acc(p.dtype)) for p in parts] if total is None else [t + p for t, p in zip(total, parts)]
            loss, weight = loss + l_.detach() * w, weight + w
        return total, loss / weight, weight

    def batch_generator(self, seed: int, key: int, device: torch.device | str) -> torch.Generator:
        """The generator of batch ``key``'s random draws (the key ``fn`` of :meth:`accumulate`
        receives): seeded by ``(seed, key)`` on the batch's first piece and continued by its later
        pieces (``max_batch``), so the pieces draw one stream instead of each restarting it, and
        every pass over the data draws the same samples (the Monte-Carlo Fisher stays one matrix)."""
        last = self._stream
        if last is not None and last[:2] == (seed, key):
            return last[2]
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + key) % 2**64)  # manual_seed takes 64 bits
        self._stream = (seed, key, gen)
        return gen

    def loss_and_gradient(self, on_batch: Callable[[Any, Tensor], None] | None = None) -> tuple[float, Tensor]:
        """The loss over all the data and its gradient (flat, in the space's order), batches
        weighted as in every curvature product. ``on_batch(outputs, targets)`` sees each batch's
        detached outputs (e.g. to count correct predictions).

        Cost: one forward and one backward pass over the data.
        """
        def extra(out: Any, y: Tensor, key: int) -> list[Tensor]:
            if on_batch is not None:
                on_batch(out, y)
            return []

        totals = self.gradient_pass(extra, extra_shapes=[])
        return totals.loss, totals.mean(totals.sums[0])

    def gradient_pass(self, extra: Callable[[Any, Tensor, int], list[Tensor]] | None = None,
                      extra_shapes: list[tuple[int, ...]] | None = None) -> Totals:
        """One forward and backward pass: ``sums[0]`` is the weighted sum of the batches' gradients
        (flat; ``Totals.mean`` of it is the gradient), followed by the sums of what
        ``extra(outputs, targets, key)`` returns per batch (detached outputs; e.g. correct
        predictions), all summed over the ranks in the one all-reduce. ``extra_shapes``: the shapes
        of what ``extra`` returns, if known (see :meth:`accumulate`'s ``shapes``).

        Cost: one forward and one backward pass over the data.
        """
        f = self.function()

        def batch(x: Any, y: Tensor, key: int):
            with torch.enable_grad():
                params = {n: p.requires_grad_(True) for n, p in self.space.detached().items()}
                out = f(params, x)
                value = self.loss(out, y)
                g = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            w = self.weight(out, y)
            flat = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                              for gi, p in zip(g, params.values())])
            more = [] if extra is None else extra(out.detach() if isinstance(out, Tensor) else out, y, key)
            return [flat * w, *more], value.detach(), w

        known = extra is None or extra_shapes is not None
        shapes = [(self.space.dim,), *(extra_shapes or [])] if known else None
        return self.accumulate(batch, what="gradient", shapes=shapes)

    # checks -----------------------------------------------------------------------------
    def _validate(self) -> tuple[Any, Tensor, Tensor]:
        """One forward on the first batch: the loss must be a scalar tensor. Returns that batch's
        (detached) outputs, targets and loss (whose finiteness the caller checks, knowing the terms)."""
        x, y = self.batches.first()
        if self.max_batch is not None and y.shape[0] > self.max_batch:  # what one pass would see at once
            x, y = split_batch(x, y, self.max_batch)[0]
        dev = self.space.device
        for t in tensors_of(x) + [y]:
            if t.device.type != dev.type:
                raise DataError(
                    f"batch 0 is on {t.device} but the model's parameters on {dev}; move the data to the "
                    f"model's device (x.to('{dev}'), y.to('{dev}')) or the model to the data's"
                )
        with self.in_mode(), torch.no_grad():
            try:
                out = self.function()(self.space.detached(), x)
            except ModelError:
                raise
            except (TypeError, ValueError, RuntimeError, IndexError) as e:
                if isinstance(e, OutOfMemory):
                    raise TooLargeError(
                        f"batch 0 ({int(y.shape[0])} examples) does not fit in device memory even for a "
                        f"forward pass; pass max_batch={max(1, int(y.shape[0]) // 2)} (or smaller)"
                    ) from None
                raise ModelError(
                    f"the model raised {type(e).__name__} on the inputs of batch 0: {e}. Check that "
                    "model(inputs) runs on each batch's inputs as given (a dict of inputs is passed as "
                    "keyword arguments)"
                ) from e
            try:
                loss = self.loss_fn(out, y)
            except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                raise LossError(
                    f"loss_fn(model(inputs), targets) raised {type(e).__name__} on batch 0: {e}. Check "
                    f"that the model returns what loss_fn expects (it returned {type(out).__name__}"
                    f"{output_hint(out)}) and that the targets have the dtype and shape the loss needs"
                ) from e
        if not isinstance(loss, Tensor):
            raise LossError(f"loss_fn returned {type(loss).__name__}; it must return a scalar tensor")
        if loss.numel() != 1 or loss.dim() > 1:
            raise LossError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a scalar "
                "(use reduction='mean' or 'sum', or .mean() the per-example losses)"
            )
        return out, y, loss

    # distributed ------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    def _rank_text(self) -> str:
        return "" if self.group is None else f" of rank {dist.get_rank(self.group)}"

    def _agree(self, what: str, value: float, failed: BaseException | None = None) -> None:
        """Refuse ranks that hold different ``value`` (one all-reduce of ``[v, v^2, 1]`` and
        each rank's failure code). ``failed``: this rank's own error, raised here after the
        all-reduce so that the other ranks learn of it instead of waiting for this rank."""
        codes = self._failure_codes(failed)
        t = torch.cat([torch.tensor([value, value * value, 1.0], dtype=torch.float64), codes]).to(self._comm_device())
        dist.all_reduce(t, group=self.group)
        self._raise_failures(t[3:], failed, "while checking its model and data")
        if not _all_equal(t[0], t[1], t[2]):
            raise ModelError(
                f"the ranks disagree on the {what} (this rank has {value:g}): every rank must build the "
                "same model and choose the same parameters; only the data differs between ranks"
            )

    def _failure_codes(self, failed: BaseException | None) -> Tensor:
        """One number per rank, the others zero: this rank's error class (0: none)."""
        codes = torch.zeros(self.world, dtype=torch.float64)
        if failed is not None:
            codes[dist.get_rank(self.group)] = _error_code(failed)
        return codes

    def _raise_failures(self, codes: Tensor, failed: BaseException | None, when: str) -> None:
        """After the all-reduce: re-raise this rank's error, or raise the class of the first
        rank that failed, so that every rank stops with the same kind of error."""
        if failed is not None:
            raise failed
        bad = [(r, int(round(float(c)))) for r, c in enumerate(codes.tolist()) if c]
        if bad:
            r, code = bad[0]
            cls = _SHARED_ERRORS[code - 1] if code <= len(_SHARED_ERRORS) else CurvkitError
            what = cls.__name__ if code <= len(_SHARED_ERRORS) else "an error that is not curvkit's"
            others = f" (and ranks {', '.join(str(q) for q, _ in bad[1:])})" if len(bad) > 1 else ""
            raise cls(
                f"rank {r}{others} stopped with {what} {when}; its own message says what is wrong there. "
                "Every rank stops here so that none waits for it forever"
            )

    def _comm_device(self) -> torch.device:
        if dist.get_backend(self.group) == "gloo":
            return torch.device("cpu")
        space = getattr(self, "space", None)  # absent when building the space itself failed
        return space.device if space is not None else torch.device("cuda", torch.cuda.current_device())

    def _all_reduce(self, sums: list[Tensor], stats: list[Tensor], check: Tensor | None,
                    failed: BaseException | None, nonfinite: Tensor):
        """One all-reduce of the sums, the stats, every rank's failure code (``failed``, or a
        non-finite loss) and ``check``'s agreement test. Re-raises ``failed`` after it; raises
        ArgumentError on every rank if ``check`` differs. Returns the sums, the stats and the
        failure codes (one per rank) for the caller to raise on."""
        dev = self._comm_device()
        acc = sums[0].dtype if sums else torch.float64
        flat = torch.cat([s.reshape(-1).to(acc) for s in sums]) if sums else torch.zeros(0, dtype=acc)
        codes = self._failure_codes(failed).to(nonfinite.device)
        if failed is None:  # no host sync: the code is set on the device
            codes[dist.get_rank(self.group)] = nonfinite.to(torch.float64) * _error_code(NonFiniteError(""))
        extra = torch.cat([torch.cat(stats).to(torch.float64), codes])
        if check is not None:
            c = check.detach().reshape(-1).to(device=extra.device, dtype=torch.float64)
            extra = torch.cat([extra, torch.stack([c, c * c], 1).reshape(-1), extra.new_ones(1)])
        buf = torch.cat([flat.to(dev), extra.to(device=dev, dtype=acc)])
        dist.all_reduce(buf, group=self.group)
        if failed is not None:
            raise failed
        head = len(stats) + self.world
        flat, extra = buf[: flat.numel()].to(sums[0].device if sums else dev), buf[flat.numel():].to(device="cpu", dtype=torch.float64)
        codes = extra[len(stats):head]
        if check is not None and not codes.any():
            c, W = extra[head:-1].reshape(-1, 2), extra[-1]
            tol = 1e-9 if acc == torch.float64 else 1e-4
            if not all(_all_equal(s, s2, W, tol) for s, s2 in c):
                raise ArgumentError(
                    "the ranks multiplied different vectors: every rank must call the same algorithm with "
                    "the same vectors (pass the same seed= on every rank; seed=None draws fresh entropy "
                    "in each process)"
                )
        out, i = [], 0
        for s in sums:
            out.append(flat[i : i + s.numel()].view_as(s).to(s.dtype))
            i += s.numel()
        return out, [extra[j] for j in range(len(stats))], codes


# the classes a rank's failure is announced as on the other ranks (code = index + 1)
_SHARED_ERRORS = (NonFiniteError, DataError, ModelError, LossError, ArgumentError, ShapeError, TooLargeError,
                  CurvkitError)


def _error_code(e: BaseException) -> int:
    for j, cls in enumerate(_SHARED_ERRORS):
        if type(e) is cls:
            return j + 1
    for j, cls in enumerate(_SHARED_ERRORS):  # a subclass: announced as its nearest listed base
        if isinstance(e, cls):
            return j + 1
    return len(_SHARED_ERRORS) + 1


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def output_hint(out: Any) -> str:
    """For a model that returned a dict or tuple: how to pick the tensor the loss needs."""
    if isinstance(out, Tensor) or not isinstance(out, (Mapping, tuple, list)):
        return ""
    if isinstance(out, Mapping):
        key = "'logits'" if "logits" in out else repr(next(iter(out), "key"))
        return f" with keys {list(out.keys())}; pass output={key} to give the loss that part"
    return f" of {len(out)}; pass output=0 (or the index of the logits) to give the loss that part"


def _all_equal(s: Tensor, s2: Tensor, W: Tensor, tol: float = 1e-9) -> bool:
    """Sum ``s`` and sum of squares ``s2`` of ``W`` numbers: all equal iff ``W s2 = s^2``."""
    s, s2, W = float(s), float(s2), float(W)
    return abs(W * s2 - s * s) <= tol * max(W * s2, 1e-300)


def _process_group(distributed: bool | None):
    if distributed is False:
        return None
    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError("distributed=True needs an initialised process group (torch.distributed.init_process_group)")
    return dist.group.WORLD if on else None


def _unwrap(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


@contextlib.contextmanager
def model_mode(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Run ``model`` in train or eval mode, then restore every module's own flag."""
    was = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, t in was.items():
            m.training = t


def refuse_active_dropout(model: nn.Module) -> None:
    """ModelError for a model with dropout: in train mode every pass draws a new mask."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ModelError(
                f"module {name!r} is dropout (p={m.p}); in train mode it draws a new mask on every "
                "pass, so the curvature would not be one matrix. Use mode='eval' (the default)"
            )


__all__ = ["Risk", "Totals", "model_mode", "refuse_active_dropout", "output_hint"]
