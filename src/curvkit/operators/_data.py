"""The data an operator loops over: one ``(inputs, targets)`` batch or an iterable of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError

Batch = tuple[Any, Tensor]


def is_batch(data: Any) -> bool:
    """True for a single ``(inputs, targets)`` pair of tensors (not a list of batches)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


class Batches:
    """A re-iterable view of the data that checks each batch and can tell if it changed.

    Every pass yields the same batches; a DataLoader is re-iterated on every pass.
    """

    def __init__(self, data: Any):
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
        for i, (x, y) in enumerate(self._checked()):
            self.sizes.append(batch_size(x, y, i))
            prints.append(fingerprint(x, y).cpu())
        self._prints = torch.stack(prints) if prints else torch.zeros(0, dtype=torch.float64)
        if not self.sizes:
            raise DataError("data is empty: it holds no batch")
        self.num_data = sum(self.sizes)

    def _checked(self) -> Iterator[Batch]:
        for i, batch in enumerate(self._source):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
                raise DataError(_BATCH_HINT.format(what=f"batch {i}: {what}"))
            x, y = batch
            if not isinstance(y, Tensor):
                raise DataError(f"batch {i}: targets must be a tensor, got {type(y).__name__}")
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
        raise DataError("data is empty: it holds no batch")


def batch_size(x: Any, y: Tensor, i: int) -> int:
    n = int(y.shape[0]) if y.dim() > 0 else 0
    if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != n):
        raise DataError(
            f"batch {i}: inputs have {x.shape[0] if x.dim() else 0} examples but targets {n}; "
            "the first dimension of both must be the batch"
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
        if isinstance(x, Tensor) and x.is_floating_point():
            head = x.reshape(x.shape[0], -1)[:, :16].to(torch.float64)
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
