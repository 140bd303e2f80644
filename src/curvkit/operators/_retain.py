"""Gradient graphs kept between Hessian products inside one run of an algorithm.

A double-backward Hessian product of a batch is a forward, a backward that records its own graph
(``create_graph=True``) and a backward through that graph. The first two do not depend on the
vector: an algorithm that makes many products on the same data (Lanczos, CG, SLQ, Hutchinson)
can keep each batch's gradient graph from its first product and differentiate it again for every
later one, which saves about a third of each product (BENCHMARKS.md). The graphs cost memory (a
batch's activations and the first backward's intermediates), so they are kept only inside
:meth:`HessianOperator.retaining` (which the algorithms enter), only while they fit in a budget,
and only while nothing they were computed from has changed: the model's parameters and buffers
and the loss's weights (their version counters and storage), the batch itself (its versions, and
compared) and the tensors the graph saved; a forward that draws random numbers is not kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..model.data import tensors_of

# of the memory free when a run starts, the most its kept graphs may take by default: on CUDA an
# out-of-memory error is caught (the product frees them all and goes on without); a host that runs
# out of memory kills the process instead, so the CPU keeps a wide margin
SHARE = {"cuda": 0.8, "cpu": 0.25}


@dataclass
class Graph:
    """One batch's gradient with its graph: what a product differentiates again."""

    x: Any
    y: Tensor
    state: tuple
    grads: tuple
    params: list[Tensor]
    live: list[int]
    loss: Tensor
    weight: Any
    nbytes: int = 0
    batch: tuple = ()  # the batch's tensors' versions when the graph was made (:func:`batch_versions`)
    random: bool = False  # its forward drew from torch's random streams: not one function, not kept

    def __post_init__(self) -> None:
        self.batch = batch_versions(self.x, self.y)


@dataclass
class Kept:
    """The graphs kept in one run, by the batch piece they belong to, within ``budget`` bytes.
    ``examples``: all or none. The data's examples, when the graphs are kept only if all of them
    fit (``retain_graphs=True``): the first graph's bytes per example over them must fit the
    budget, else none is kept in this run. A partial keep puts every fresh product's working
    memory on top of the kept graphs for a fraction of the saving (a 709M GPT on an H200, one of
    four graphs kept: top-1 took 44.1 s and 135 GiB, against 39.4 s and 78 GiB keeping none)."""

    budget: float
    examples: int | None = None
    held: int = 0
    graphs: dict[tuple, Graph] = field(default_factory=dict)

    def take(self, key: tuple, x: Any, y: Tensor, state: tuple) -> Graph | None:
        """The graph kept for ``key`` if it is still this batch's at these parameters, else None
        (a stale one is dropped)."""
        g = self.graphs.get(key)
        if g is None:
            return None
        if g.state == state and g.batch == batch_versions(g.x, g.y) and same(g.x, x) and same(g.y, y):
            return g
        self.drop(key)
        return None

    def fits(self, nbytes: int, examples: int) -> bool:
        """Whether a graph of ``nbytes`` for ``examples`` examples may be kept."""
        if self.examples is not None and not self.graphs and self.projected(nbytes / max(examples, 1)) == 0:
            self.budget = 0  # not all would fit (judged at the first graph): keep none in this run
        return self.held + nbytes <= self.budget

    def projected(self, per_example: float) -> int:
        """The examples whose graphs fit the budget at ``per_example`` bytes each (all or none when
        ``examples`` is set)."""
        n = int(self.budget // max(per_example, 1e-300))
        return 0 if self.examples is not None and n < self.examples else n

    def keep(self, key: tuple, g: Graph) -> None:
        self.graphs[key] = g
        self.held += g.nbytes

    def drop(self, key: tuple) -> None:
        self.held -= self.graphs.pop(key).nbytes

    def clear(self) -> None:
        self.graphs.clear()
        self.held = 0


def same(a: Any, b: Any) -> bool:
    """Whether two batches (tensors, or mappings/sequences of them) hold the same values. The same
    tensor unchanged (its version counter) is the same without a look at its values."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a is b:
            return True
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not known to be the same
        return False


def batch_versions(x: Any, y: Tensor) -> tuple:
    """The version counters of a batch's tensors: a write in place to the batch (or to a tensor it
    is a view of) changes them, where comparing the tensor with itself could not tell."""
    return tuple(t._version for t in [*tensors_of(x), y])


def rng_states(device: torch.device) -> list[Tensor]:
    """The states of torch's default random streams a forward on ``device`` may draw from: a forward
    that changes them (noise, a sample) computes another function at every product."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def drew(before: list[Tensor], device: torch.device) -> bool:
    """Whether a random stream moved since ``before`` (:func:`rng_states`)."""
    return not all(torch.equal(a, b) for a, b in zip(before, rng_states(device)))


def versions(tensors: list[Tensor]) -> tuple:
    """What changes when a tensor is written in place (its version) or replaced (its storage)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


# a container's memory limit and use (cgroup v2, v1): /proc/meminfo shows the host's memory
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def free_memory(device: torch.device) -> float:
    """Bytes a run could still allocate: free device memory plus the caching allocator's unused
    blocks on CUDA; the host's available memory otherwise (``MemAvailable``, else half the RAM),
    at most what the process's container (cgroup) may still use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    room = _cgroup_room()
    return _host_available() if room is None else min(_host_available(), room)


def _host_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cgroup_room() -> float | None:
    """The container's memory limit less its use, or None where there is no limit to read."""
    for limit, usage in CGROUP_FILES:
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text == "max":
                return None
            with open(usage) as f:
                used = int(f.read().strip())
            return max(0.0, float(int(text) - used))
        except (OSError, ValueError):
            continue
    return None


class SavedBytes:
    """Counts the bytes autograd saves for backward while active (``saved_tensors_hooks``): the
    memory a kept graph holds, on any device. Tensors that live anyway (the parameters and
    buffers) and storages met before are not counted; the batch's saved tensors are (the graph
    holds the batch, which a DataLoader's next pass would not)."""

    def __init__(self, exclude: list[Tensor]):
        self.seen = {_storage(t) for t in exclude}
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> tuple[Tensor, int]:
        key = _storage(t)
        if key is not None and key not in self.seen:
            self.seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        # an alias without autograd history: the tensor itself would close a reference cycle for a
        # saved output (output -> its node -> saved output) that only the garbage collector breaks,
        # so a kept graph would outlive its release. Autograd restores the history on unpacking.
        # With hooks autograd no longer checks that a saved tensor is unchanged: its version is
        # kept to check it on unpacking (:func:`_unpack`).
        return t.detach(), t._version

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class Stale(RuntimeError):
    """A tensor a graph saved was written in place since: the check autograd makes without hooks."""


def _unpack(packed: tuple[Tensor, int]) -> Tensor:
    t, version = packed
    if t._version != version:
        raise Stale(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{t.dtype}, {tuple(t.shape)}] is at version {t._version}; expected version "
            f"{version} instead (a tensor saved for the backward was written in place after it was saved)"
        )
    return t


def _storage(t: Any) -> tuple | None:
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, AttributeError):  # no storage (a wrapper subclass)
        return None
