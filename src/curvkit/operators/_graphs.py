"""CUDA-graph replay of per-batch curvature products.

A Hessian-vector product through ``torch.func`` launches a few thousand small kernels from
Python; for batches of a few hundred examples the GPU waits on that Python. Capturing the
per-batch product once and replaying it removes the Python and launch cost. A graph is keyed
by the shapes of the batch and the number of probes and captured the first time a key is
seen, right after a warm-up run whose result is the product asked for (so capture costs no
extra pass); graphs are dropped when the parameters are reallocated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..model.kernels import OutOfMemory, fused_op

BatchFn = Callable[[Any, Tensor, list[Tensor], int], tuple[list[Tensor], Tensor, Any]]


class _Captured:
    def __init__(self, fn: BatchFn, x: Tensor, y: Tensor, V: list[Tensor], index: int):
        self.x, self.y, self.V = x.clone(), y.clone(), [v.clone() for v in V]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            self.first = fn(self.x, self.y, self.V, index)  # the product asked for: no pass wasted
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.loss, self.weight = fn(self.x, self.y, self.V, index)

    def __call__(self, x: Tensor, y: Tensor, V: list[Tensor]) -> tuple[list[Tensor], Tensor, Any]:
        self.x.copy_(x)
        self.y.copy_(y)
        for dst, src in zip(self.V, V):
            dst.copy_(src)
        self.graph.replay()
        w = self.weight.clone() if isinstance(self.weight, Tensor) else self.weight
        # outputs are overwritten by the next replay: the loop adds them up before that
        return self.out, self.loss.clone(), w


class GraphCache:
    """Replays captured per-batch products; falls back to eager where capture cannot work."""

    def __init__(self, max_graphs: int = 2):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.failed = False
        self._ptrs: tuple[int, ...] = ()

    def __call__(self, fn: BatchFn, x: Any, y: Tensor, V: list[Tensor], index: int, params: list[Tensor]):
        # fn is passed per call, not stored: a stored bound method would keep the operator and
        # its graphs' memory alive in a reference cycle
        if self.failed or not isinstance(x, Tensor) or not x.is_cuda:
            return fn(x, y, V, index)
        ptrs = tuple(p.data_ptr() for p in params)
        if ptrs != self._ptrs:  # parameters were reallocated (e.g. model.to()): graphs read stale memory
            self.graphs.clear()
            self._ptrs = ptrs
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, V[0].shape[0])
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = _Captured(fn, x, y, V, index)
            except Exception as e:  # noqa: BLE001 - whatever capture broke, eager decides
                # out of memory, or a fused kernel without second derivatives: not a reason to give up
                # graphs; the data loop handles both (micro-batches, differentiable kernels). Anything
                # else (a host-device copy inside the model, a transform's error raised as a
                # ModelError): run eagerly, where a real error shows again
                if isinstance(e, OutOfMemory) or fused_op(e) is not None:
                    raise
                self.failed = True  # an op that cannot be captured: stay eager from now on
                torch.cuda.synchronize()
                return fn(x, y, V, index)
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:  # each graph holds its activations' memory
                self.graphs.popitem(last=False)
            first, graph.first = graph.first, None
            return first
        self.graphs.move_to_end(key)
        return graph(x, y, V)
