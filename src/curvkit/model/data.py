"""The data a curvature computation loops over: one ``(inputs, targets)`` batch or an iterable of
them, re-iterated on every pass and checked to be the same every time.

Inputs may be a tensor or any nest of tuples, lists and dicts of tensors (a transformers batch);
their first dimension is the batch, which is what :func:`split_batch` cuts into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError

Batch = tuple[Any, Tensor]


def is_batch(data: Any) -> bool:
    """True for a single ``(inputs, targets)`` pair (not a list of batches): targets a tensor,
    inputs a tensor or a nest of dicts, tuples and lists holding tensors (a list of batches has a
    pair, never a tensor, in second place)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)):
        return False
    x = data[0]
    return isinstance(x, Tensor) or (isinstance(x, (dict, tuple, list)) and bool(tensors_of(x)))


class Batches:
    """A re-iterable view of the data that checks each batch and can tell if it changed.

    Every pass yields the same batches; a DataLoader is re-iterated on every pass.
    """

    def __init__(self, data: Any):
        it: Iterator | None = None  # the scan below is the first pass: over this iterator, not a new one
        if is_batch(data):
            self._source: Iterable = [tuple(data)]
        elif isinstance(data, dict):
            raise DataError(_BATCH_HINT.format(what="a dict"))
        else:
            try:
                it = iter(data)
            except TypeError:
                raise DataError(
                    f"data must be an (inputs, targets) batch or an iterable of them, got "
                    f"{type(data).__name__}"
                ) from None
            if it is data:
                raise DataError(
                    "data is a one-shot iterator (e.g. a generator); every curvature product passes "
                    "over the data again, so pass a list of batches or a DataLoader instead"
                )
            self._source = data
        self.sizes: list[int] = []
        prints = []
        for i, (x, y) in enumerate(self._checked(it)):
            self.sizes.append(batch_size(x, y, i))
            prints.append(fingerprint(x, y).cpu())
        self._prints = torch.stack(prints) if prints else torch.zeros(0, dtype=torch.float64)
        if not self.sizes:
            raise DataError("data is empty: it holds no batch")
        self.num_data = sum(self.sizes)

    def _checked(self, it: Iterator | None = None) -> Iterator[Batch]:
        for i, batch in enumerate(self._source if it is None else it):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
                raise DataError(_BATCH_HINT.format(what=f"batch {i}: {what}"))
            x, y = batch
            if not isinstance(y, Tensor):
                raise DataError(f"batch {i}: targets must be a tensor, got {type(y).__name__}")
            devices = {t.device for t in tensors_of(x)} | {y.device}
            if len(devices) > 1:
                raise DataError(
                    f"batch {i}: inputs and targets are on different devices ({', '.join(sorted(map(str, devices)))}); "
                    "move both to the model's device, e.g. (x.to(device), y.to(device))"
                )
            yield x, y

    def __iter__(self) -> Iterator[tuple[int, Any, Tensor]]:
        """Yield ``(index, inputs, targets)``; raise DataError if the data changed since the scan.

        The checksums are compared once at the end of the pass, so a GPU pass never waits
        on the host between batches.
        """
        prints = []
        for i, (x, y) in enumerate(self._checked()):
            if i >= len(self.sizes) or y.shape[0] != self.sizes[i]:
                raise DataError(_CHANGED.format(i=i))
            prints.append(fingerprint(x, y))
            yield i, x, y
        if len(prints) != len(self.sizes):
            raise DataError(_CHANGED.format(i=len(prints)))
        now = torch.stack(prints).cpu()
        # NaN != NaN: a batch holding NaN is unchanged if it was NaN before (the loss check reports it)
        diff = ((now != self._prints) & ~(now.isnan() & self._prints.isnan())).nonzero()
        if len(diff):
            raise DataError(_CHANGED.format(i=int(diff[0, 0])))

    def first(self) -> tuple[Any, Tensor]:
        for x, y in self._checked():
            return x, y
        raise DataError(_CHANGED.format(i=0) + " (this pass yielded no batch at all)")


def tensors_of(x: Any) -> list[Tensor]:
    """The tensors of a nest of tuples, lists and dicts (in order)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_of(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_of(v)]
    return []


def map_tensors(fn: Any, x: Any) -> Any:
    """``fn`` applied to every tensor of a nest of tuples, lists and dicts (other leaves kept)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return type(x)((k, map_tensors(fn, v)) for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x


def split_batch(x: Any, y: Tensor, size: int) -> list[tuple[Any, Tensor]]:
    """Consecutive micro-batches of at most ``size`` examples, cutting every tensor of the
    inputs along its first dimension (non-tensor leaves are shared). Views: no copy."""
    n = int(y.shape[0])
    return [(map_tensors(lambda t, i=i: t[i : i + size], x), y[i : i + size]) for i in range(0, n, size)]


def batch_size(x: Any, y: Tensor, i: int) -> int:
    n = int(y.shape[0]) if y.dim() > 0 else 0
    for t in tensors_of(x):
        if t.dim() == 0 or t.shape[0] != n:
            what = "inputs have" if t is x else "an input tensor has"
            raise DataError(
                f"batch {i}: {what} {t.shape[0] if t.dim() else 0} examples but targets {n}; the first "
                "dimension of every input tensor and of the targets must be the batch"
            )
    if n == 0:
        raise DataError(f"batch {i} is empty (0 examples); drop empty batches from the data")
    return n


def fingerprint(x: Any, y: Tensor) -> Tensor:
    """A cheap checksum that changes when batches are reshuffled or re-augmented."""
    with torch.no_grad():
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        pos = torch.arange(1, flat.shape[0] + 1, dtype=torch.float64, device=flat.device)
        fp = (flat.sum(1) * pos).sum()
        for t in tensors_of(x):
            head = t.reshape(t.shape[0], -1)[:, :16].to(torch.float64)
            fp = fp + (head.sum(1) * pos).sum()
        return fp


_BATCH_HINT = (
    "each batch must be an (inputs, targets) pair, got {what}; wrap your data as "
    "[(x1, y1), (x2, y2), ...] or use a DataLoader over a TensorDataset(x, y)"
)
_CHANGED = (
    "the data changed between passes (batch {i} differs from the first pass): every product "
    "would see a different matrix. Use a DataLoader with shuffle=False and no random "
    "augmentation, or materialise the batches in a list"
)
