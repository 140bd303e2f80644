"""Choosing parameters, and the vector space flat vectors live in.

A :class:`VectorSpace` is a list of named tensor shapes with one dtype and device: a flat
vector ``(n,)`` or block ``(n, k)`` is their concatenation. :class:`ParamSpace` is the space of
a model's chosen parameters (what the curvature operators act on); an operator over a model's
*inputs* uses a plain :class:`VectorSpace` over the input shapes, with the same helpers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from ..errors import ModelError, ShapeError

ParamSpec = Union[None, str, Callable[[str], bool], nn.Module, Iterable[Union[str, Tensor]]]


def resolve_params(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, Tensor]]:
    """The ``(name, tensor)`` pairs an operator differentiates, in the model's order.

    ``params`` is ``None`` (every trainable parameter), a regular expression matched with
    ``re.search`` against names (``"fc|conv1"``), a predicate on names, a sub-module of
    ``model``, or an iterable of exact names or of parameter tensors of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())  # duplicates (tied weights) removed by torch
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ModelError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "unfreeze some or pass params= explicitly"
            )
    elif isinstance(params, str):
        rx = re.compile(params)
        chosen = [(n, p) for n, p in named if rx.search(n)]
        if not chosen:
            raise ModelError(f"no parameter name matches {params!r}; names are: {_names(named)}")
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if not chosen:
            raise ModelError("params= is a module that holds no parameter of the model")
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n)]
        if not chosen:
            raise ModelError(f"the params= filter selects no parameter; names are: {_names(named)}")
    else:
        chosen = _from_list(named, list(params))
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ModelError(
            f"the chosen parameters mix dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; move the model to one dtype and device (model.to(...))"
        )
    if not dtypes.pop().is_floating_point:
        raise ModelError("curvature needs floating-point parameters")
    return chosen


def _from_list(named: list[tuple[str, Tensor]], items: list) -> list[tuple[str, Tensor]]:
    if not items:
        raise ModelError("params= is empty; pass None for all trainable parameters")
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    wanted: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item not in by_name:
                raise ModelError(f"the model has no parameter named {item!r}; names are: {_names(named)}")
            wanted.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ModelError(
                    f"a tensor of shape {tuple(item.shape)} in params= is not a parameter of the model; "
                    "pass tensors from model.parameters() (not copies), or names"
                )
            wanted.add(by_id[id(item)])
        else:
            raise ModelError(f"params= items must be names or parameter tensors, got {type(item).__name__}")
    return [(n, p) for n, p in named if n in wanted]


def _names(named: Sequence[tuple[str, Tensor]], limit: int = 12) -> str:
    names = [n for n, _ in named]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class VectorSpace:
    """Named blocks of given shapes, flattened into one vector in order (one dtype, one device)."""

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], dtype: torch.dtype,
                 device: torch.device | str):
        self.names, self.shapes = list(names), [torch.Size(s) for s in shapes]
        self.dtype, self.device = dtype, torch.device(device)
        self.sizes = [s.numel() for s in self.shapes]
        self.dim = sum(self.sizes)

    def split(self, v: Tensor) -> list[Tensor]:
        """Flat vector (n,) or block (n, k) -> per-block views (shape ``(*shape[, k])``)."""
        return unflatten(v, self.shapes)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-block tensors (e.g. gradients) -> one flat vector in this space's order."""
        if len(tensors) != len(self.shapes) or any(t.shape != s for t, s in zip(tensors, self.shapes)):
            raise ShapeError(
                f"expected {len(self.shapes)} tensors of shapes {[tuple(s) for s in self.shapes]}, got "
                f"{[tuple(t.shape) for t in tensors]}"
            )
        return flatten(tensors)

    def probes(self, V: Tensor) -> list[Tensor]:
        """A block (n, k) -> per-block tensors with the probe dimension first, ``(k, *shape)``."""
        return [t.movedim(-1, 0).contiguous() for t in self.split(V)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.names)} blocks, n={self.dim}, {self.dtype}, {self.device})"


class ParamSpace(VectorSpace):
    """The chosen parameters of a model (:func:`resolve_params`), in the model's order.

    Holds the live parameter tensors, so anything built on it measures the current weights.
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None,
                 named: Sequence[tuple[str, Tensor]] | None = None):
        self.model = model
        self.named = list(named) if named is not None else resolve_params(model, params)
        p0 = self.named[0][1]
        super().__init__([n for n, _ in self.named], [p.shape for _, p in self.named], p0.dtype, p0.device)

    @property
    def tensors(self) -> list[Tensor]:
        return [p for _, p in self.named]

    def detached(self) -> dict[str, Tensor]:
        """``{name: parameter.detach()}``: the values a functional call differentiates."""
        return {n: p.detach() for n, p in self.named}

    def restrict(self, names: Sequence[str]) -> ParamSpace:
        """The sub-space of some of these parameters (in this space's order)."""
        keep = set(names)
        return ParamSpace(self.model, named=[(n, p) for n, p in self.named if n in keep])


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter tensors into one flat vector (the operator's order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a flat vector (n,) or a block (n, k) into per-parameter views.

    A block gives tensors of shape ``(*param_shape, k)``.
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if vec.shape[0] != sum(sizes):
        raise ShapeError(f"expected a vector of length {sum(sizes)}, got {vec.shape[0]}")
    trailing = tuple(vec.shape[1:])
    return [c.reshape(*s, *trailing) for c, s in zip(torch.split(vec, sizes), shapes)]
