"""Linear operators and the curvature base class that owns the data loop.

:class:`LinearOperator` is what every algorithm in :mod:`curvkit.linalg` consumes: ``shape``,
``dtype``, ``device`` and ``@`` on a vector ``(n,)`` or a block ``(n, k)``. Operators compose
(``H + 1e-3 * identity_like(H)``, ``2 * H``, ``A @ B``) so damping needs no special code.

:class:`CurvatureOperator` is the base of every curvature matrix of a model. It implements the
data loop once: for each batch it asks the subclass for the product of that batch's curvature
with the probes (all ``k`` at once, ``torch.func.vmap``-ed where the model allows), weights it so
that the result is the curvature of the loss over *all* the data, and checks for NaN/inf.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ArgumentError, LossError, ModelError, NonFiniteError, ShapeError, TooLargeError
from ._data import Batches
from ._graphs import GraphCache
from ._losses import loss_terms
from ._params import ParamSpec, flatten, resolve_params, unflatten

Mode = Literal["eval", "train"]


class LinearOperator:
    """An n x n linear map on flat torch vectors; subclasses implement :meth:`_matmat`."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _matmat(self, V: Tensor) -> Tensor:  # V: (n, k), already checked
        raise NotImplementedError

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        V = self._check_input(other)
        if V.dim() == 1:
            return self._matmat(V[:, None])[:, 0]
        return self._matmat(V)

    def _check_input(self, v: Any) -> Tensor:
        n = self.shape[1]
        if not isinstance(v, Tensor):
            hint = " (use .to_scipy() for numpy arrays)" if isinstance(v, np.ndarray) else ""
            raise ShapeError(f"expected a torch.Tensor of shape ({n},) or ({n}, k), got {type(v).__name__}{hint}")
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise ShapeError(
                f"expected a vector of shape ({n},) or a block ({n}, k), got {tuple(v.shape)}; "
                "vectors are flat over the operator's parameters (see .split / .flatten)"
            )
        if v.dtype != self.dtype:
            raise ShapeError(f"vector dtype {v.dtype} does not match the operator's {self.dtype}; use v.to({self.dtype})")
        if v.device != self.device:
            raise ShapeError(f"vector is on {v.device} but the operator on {self.device}; use v.to('{self.device}')")
        return v

    # composition -----------------------------------------------------------------------
    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __mul__(self, c: float) -> LinearOperator:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = c.item()
        if not isinstance(c, (int, float)):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __truediv__(self, c: float) -> LinearOperator:
        return ScaledOperator(self, 1.0 / float(c))

    # conversions -----------------------------------------------------------------------
    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` that takes and returns numpy arrays.

        Each scipy product is one product of this operator (a block for ``matmat``).
        """
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.ascontiguousarray(X), dtype=self.dtype, device=self.device)
            return (self @ V).detach().cpu().numpy()

        return ScipyOperator(self.shape, matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np_dtype)

    def dense(self, max_size: int = 4096, chunk: int = 64) -> Tensor:
        """The full n x n matrix, for small problems and tests.

        Cost: n operator products, in blocks of ``chunk`` columns. Refuses ``n > max_size``
        (n^2 numbers and n products); raise ``max_size`` if you really want it.
        """
        n = self.shape[0]
        if n > max_size:
            gib = n * n * torch.empty(0, dtype=self.dtype).element_size() / 2**30
            raise TooLargeError(
                f"a dense {n} x {n} matrix ({gib:.1f} GiB, {n} products) exceeds max_size={max_size}; "
                "use matrix-free algorithms (ck.eigenvalues, ck.trace, ...) or pass a larger max_size"
            )
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return torch.cat([self @ eye[:, i : i + chunk] for i in range(0, n, chunk)], dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _same_space(a: LinearOperator, b: LinearOperator) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ShapeError(
            f"cannot combine operators of shape/dtype/device {a.shape}/{a.dtype}/{a.device} and "
            f"{b.shape}/{b.dtype}/{b.device}"
        )


class SumOperator(LinearOperator):
    """``A + B``: one product with each per product."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        _same_space(A, B)
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V + self.B @ V


class ScaledOperator(LinearOperator):
    """``c * A``."""

    def __init__(self, A: LinearOperator, c: float):
        self.A, self.c = A, c
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.c * (self.A @ V)


class ProductOperator(LinearOperator):
    """``A @ B`` applied right to left."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        _same_space(A, B)
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ (self.B @ V)


class IdentityOperator(LinearOperator):
    """The n x n identity (free: no product)."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.shape, self.dtype, self.device = (n, n), dtype, torch.device(device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


def identity_like(A: LinearOperator) -> IdentityOperator:
    """The identity in ``A``'s space, for damping: ``H + 1e-3 * identity_like(H)``."""
    return IdentityOperator(A.shape[0], A.dtype, A.device)


class FunctionOperator(LinearOperator):
    """Wrap a function ``V (n, k) -> (n, k)`` as an operator (e.g. a product you wrote yourself)."""

    def __init__(self, matmat: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype, device="cpu"):
        self._fn = matmat
        self.shape, self.dtype, self.device = (n, n), dtype, torch.device(device)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V)


# --------------------------------------------------------------------------------------------
class CurvatureOperator(LinearOperator):
    """Base of the curvature matrices of ``loss_fn(model(inputs), targets)`` over ``data``.

    The matrix is that of the loss over all the data, with the loss function's own reduction:
    for ``reduction="mean"`` (the default, and what a plain function is taken to do) each batch
    is weighted by its share of the loss's terms (its examples; for cross-entropy the targets
    that are not ``ignore_index``, or their class weights), for ``"sum"`` by 1. So batching the
    same data differently gives the same operator.

    Subclasses implement :meth:`_batch_matmat`, the product of one batch's curvature with the
    probes, given as per-parameter tensors with a leading probe dimension ``k``.

    Args:
        model: the network; evaluated in ``mode`` ("eval" by default) and restored afterwards.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar.
        data: one ``(inputs, targets)`` batch or an iterable of them (a DataLoader included,
            re-iterated on every product; it must yield the same batches every time).
        params: which parameters (see :func:`curvkit.operators.resolve_params`); all trainable
            ones by default. Vectors are flat over them in the model's order.
        mode: "eval" (BatchNorm uses running statistics, dropout is off) or "train"
            (BatchNorm uses batch statistics; refused if the model has active dropout, which
            would make each product a different random matrix).
        reduction: override the loss's reduction ("mean" or "sum") when it cannot be read
            from ``loss_fn.reduction``.
        cuda_graphs: replay the per-batch product as a CUDA graph (captured during the first
            product with a given batch shape and probe count). ``None``: on CUDA devices.
    """

    _graph_safe = True  # False where a batch product draws random numbers (MC Fisher)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: ParamSpec = None,
        *,
        mode: Mode = "eval",
        reduction: str | None = None,
        cuda_graphs: bool | None = None,
    ):
        if not callable(loss_fn):
            raise LossError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if mode not in ("eval", "train"):
            raise ModelError(f"mode must be 'eval' or 'train', got {mode!r}")
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self._named = resolve_params(model, params)
        if mode == "train":
            _refuse_active_dropout(model)
        self.reduction = reduction or getattr(loss_fn, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise LossError(
                f"the loss has reduction={self.reduction!r}; curvature needs a scalar loss: use "
                "reduction='mean' or 'sum'"
            )
        self.data = data if isinstance(data, Batches) else Batches(data)
        p0 = self._named[0][1]
        n = sum(p.numel() for _, p in self._named)
        self.shape, self.dtype, self.device = (n, n), p0.dtype, p0.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self._graphs = GraphCache() if cuda_graphs and self._graph_safe else None
        self._setup(*self._validate_loss())

    # parameters and vectors ------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._named]

    @property
    def param_shapes(self) -> list[torch.Size]:
        return [p.shape for _, p in self._named]

    @property
    def num_data(self) -> int:
        """Number of examples in the data (sum of batch sizes)."""
        return self.data.num_data

    def split(self, v: Tensor) -> list[Tensor]:
        """Flat vector (n,) or block (n, k) -> per-parameter tensors (shape ``(*p.shape[, k])``)."""
        return unflatten(v, self.param_shapes)

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """Per-parameter tensors (e.g. gradients) -> one flat vector in the operator's order."""
        shapes = self.param_shapes
        if len(tensors) != len(shapes) or any(t.shape != s for t, s in zip(tensors, shapes)):
            raise ShapeError(
                f"expected {len(shapes)} tensors of shapes {[tuple(s) for s in shapes]}, got "
                f"{[tuple(t.shape) for t in tensors]}"
            )
        return flatten(tensors)

    def blocks(self, by: Literal["layer", "param"] = "layer") -> dict[str, CurvatureOperator]:
        """Diagonal blocks of this operator: one per module ("layer") or per parameter.

        Parameters held by the root module itself (a bare ``nn.Linear``) form the "(root)" layer.

        Each block is the same kind of operator restricted to that block's parameters (its
        products cost a forward/backward over the data like the full operator's).
        """
        if by not in ("layer", "param"):
            raise ArgumentError(f"by must be 'layer' or 'param', got {by!r}")
        groups: dict[str, list[tuple[str, Tensor]]] = {}
        for name, p in self._named:
            key = (name.rpartition(".")[0] or "(root)") if by == "layer" else name
            groups.setdefault(key, []).append((name, p))
        out = {}
        for key, named in groups.items():
            block = object.__new__(type(self))
            block.__dict__.update(self.__dict__)
            block._named = named
            block._graphs = GraphCache() if self._graphs is not None else None
            n = sum(p.numel() for _, p in named)
            block.shape = (n, n)
            out[key] = block
        return out

    # the data loop ---------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        probes = [t.movedim(-1, 0).contiguous() for t in self.split(V)]  # (k, *p.shape) each
        out = torch.zeros(k, self.shape[0], dtype=self.dtype, device=self.device)
        losses, total = [], 0.0
        with self._in_mode():
            for i, x, y in self.data:
                if self._graphs is not None:
                    prods, loss = self._graphs(self._batch_matmat, x, y, probes, i, [p for _, p in self._named])
                else:
                    prods, loss = self._batch_matmat(x, y, probes, i)
                flat = torch.cat([t.reshape(k, -1) for t in prods], dim=1)
                if self.reduction == "mean":  # weight = the batch's share of the loss's terms
                    terms = loss_terms(self.loss_fn, y)
                    out.add_(flat * terms)
                    total = total + terms
                else:
                    out.add_(flat)
                losses.append(loss.detach().reshape(()))
        self._check_finite(torch.stack(losses), out)
        return (out / total).T if self.reduction == "mean" else out.T

    def loss_and_gradient(self, on_batch: Callable[[Any, Tensor], None] | None = None) -> tuple[float, Tensor]:
        """The loss over all the data and its gradient (flat, in the operator's order).

        Batches are weighted exactly as in the curvature products, so this is the gradient of
        the loss whose curvature the operator is. ``on_batch(outputs, targets)`` sees each
        batch's detached outputs (e.g. to count correct predictions).

        Cost: one forward and one backward pass over the data.
        """
        f, grad = self._model_fn(), torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        losses, total, mean = [], 0.0, self.reduction == "mean"
        with self._in_mode(), torch.enable_grad():
            for _, x, y in self.data:
                params = {n: p.requires_grad_(True) for n, p in self._param_dict().items()}
                out = f(params, x)
                value = self.loss_fn(out, y)
                g = torch.autograd.grad(value, list(params.values()), allow_unused=True)
                flat = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                  for gi, p in zip(g, params.values())])
                w = loss_terms(self.loss_fn, y) if mean else 1.0
                grad.add_(flat * w)
                total = total + w
                losses.append(value.detach().reshape(()) * w)
                if on_batch is not None:
                    on_batch(out.detach() if isinstance(out, Tensor) else out, y)
        losses_t = torch.stack(losses)
        self._check_finite(losses_t, grad[None])
        scale = total if mean else 1.0
        return float(losses_t.sum() / scale), grad / scale

    def _check_finite(self, losses: Tensor, out: Tensor) -> None:
        if not torch.isfinite(losses).all():
            i = int((~torch.isfinite(losses)).nonzero()[0, 0])
            raise NonFiniteError(
                f"the loss is {float(losses[i])} on batch {i}; curvature of a non-finite loss is "
                "meaningless. Check that batch's inputs and the model's parameters for NaN/inf"
            )
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                "a curvature product is NaN or inf although every loss is finite (overflow in the "
                "second derivatives?); try float64 (model.double()) or check the probes for NaN/inf"
            )

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor]:
        """Curvature of batch ``index`` times probes ``V`` (per-parameter, leading dim k).

        Returns the per-parameter products (leading dim k) and the batch's loss.
        """
        raise NotImplementedError

    # model evaluation helpers for subclasses --------------------------------------------------
    def _param_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self._named}

    def _model_fn(self) -> Callable[[dict[str, Tensor], Any], Any]:
        """``f(params, inputs)``: the model as a pure function of the chosen parameters."""
        chosen = set(self.param_names)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}
        buffers = dict(self.model.named_buffers())
        train, model = self.mode == "train", self.model

        def f(params: dict[str, Tensor], x: Any) -> Any:
            # BatchNorm in train mode updates running stats in place: on fresh copies made inside
            # the function, so the model's stay intact and torch.func transforms (which refuse to
            # mutate a captured tensor) can differentiate it
            bufs = {n: b.clone() for n, b in buffers.items()} if train else buffers
            return functional_call(model, (params, frozen, bufs), (x,))

        return f

    def _in_mode(self) -> contextlib.AbstractContextManager:
        return model_mode(self.model, train=self.mode == "train")

    def _setup(self, out: Any, y: Tensor) -> None:
        """Hook for subclasses that need the first batch's outputs (no extra forward)."""

    def _validate_loss(self) -> tuple[Any, Tensor]:
        """One forward on the first batch: the loss must be a finite scalar tensor.

        Returns that batch's (detached) outputs and targets for :meth:`_setup`.
        """
        x, y = self.data.first()
        with self._in_mode(), torch.no_grad():
            try:
                out = self._model_fn()(self._param_dict(), x)
            except (TypeError, ValueError, RuntimeError, IndexError) as e:
                raise ModelError(
                    f"the model raised {type(e).__name__} on the inputs of batch 0: {e}. Check that "
                    "model(inputs) runs on each batch's inputs as given"
                ) from e
            try:
                loss = self.loss_fn(out, y)
            except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                raise LossError(
                    f"loss_fn(model(inputs), targets) raised {type(e).__name__} on batch 0: {e}. Check "
                    f"that the model returns what loss_fn expects (it returned {type(out).__name__}) "
                    "and that the targets have the dtype and shape the loss needs"
                ) from e
        if not isinstance(loss, Tensor):
            raise LossError(f"loss_fn returned {type(loss).__name__}; it must return a scalar tensor")
        if loss.numel() != 1 or loss.dim() > 1:
            raise LossError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a scalar "
                "(use reduction='mean' or 'sum', or .mean() the per-example losses)"
            )
        if not math.isfinite(float(loss)):
            raise NonFiniteError(
                f"the loss is {float(loss)} on batch 0; check the inputs and the model's parameters for NaN/inf"
            )
        return out, y


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


def _refuse_active_dropout(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ModelError(
                f"module {name!r} is dropout (p={m.p}); in train mode it draws a new mask on every "
                "product, so the operator would not be one matrix. Use mode='eval' (the default)"
            )
