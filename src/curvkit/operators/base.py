"""The base of every curvature matrix of a model: a :class:`~curvkit.linear_operator.LinearOperator`
whose products pass over the data through the one data loop (:class:`curvkit.model.Risk`).

A subclass gives the product of ONE batch's curvature with ``k`` probes (all at once,
``torch.func.vmap``-ed where the model allows); the loop weights it so the result is the
curvature of the loss over *all* the data, on every rank under ``torch.distributed``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..linear_operator import BlockDiagonalOperator, LinearOperator
from ..model import layers as find_layers
from ..model.kernels import OutOfMemory, fused_op
from ..model.params import ParamSpec
from ..model.risk import Mode, Risk
from ._graphs import GraphCache


def transform_failed(e: BaseException) -> bool:
    """Whether ``e`` says a torch.func transform cannot run this model (so a slower path can), as
    opposed to running out of memory or meeting a fused kernel without second derivatives, which
    are never reasons to change method: the data loop micro-batches, or re-runs the model on
    differentiable kernels (:class:`curvkit.model.Risk`)."""
    return isinstance(e, (RuntimeError, NotImplementedError)) and not isinstance(e, OutOfMemory) and fused_op(e) is None


class CurvatureOperator(LinearOperator):
    """Base of the curvature matrices of ``loss_fn(model(inputs), targets)`` over ``data``.

    The matrix is that of the loss over all the data, with the loss's own reduction: each batch
    is weighted by its share of the loss's terms ("mean": its examples; for cross-entropy the
    targets that are not ``ignore_index``, or their class weights; see
    :mod:`curvkit.model.losses`), by 1 for "sum". So batching the same data differently gives the
    same operator. It follows the model's live parameters: an operator built before training
    measures the current weights at every product. A bf16/fp16 model's products run in its dtype
    and are summed over batches in float32; they take and return float32 vectors as well.

    Args:
        model: the network; evaluated in ``mode`` ("eval" by default) and restored afterwards.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar (a torch loss, a function,
            or a :class:`curvkit.model.LossSpec`).
        data: one ``(inputs, targets)`` batch or an iterable of them (a DataLoader included,
            re-iterated on every product; it must yield the same batches every time). Under
            ``torch.distributed`` each rank passes its own shard.
        params: which parameters (see :func:`curvkit.model.resolve_params`); all trainable
            ones by default. Vectors are flat over them in the model's order.
        mode: "eval" (BatchNorm uses running statistics, dropout is off) or "train"
            (BatchNorm uses batch statistics; refused if the model has active dropout).
        reduction: what a loss without a ``reduction`` attribute does ("mean" or "sum").
        output: which part of the model's output the loss sees (a key such as ``"logits"``,
            an index, or a callable).
        max_batch: the most examples one pass through the model sees (larger batches are cut).
        distributed: sum over the ranks of torch.distributed (``None``: when initialised).
        cuda_graphs: replay the per-batch product as a CUDA graph (captured during the first
            product with a given batch shape and probe count). ``None``: on CUDA devices.
    """

    _graph_safe = True  # False where a batch product draws random numbers (MC Fisher)

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, distributed: bool | None = None,
                 cuda_graphs: bool | None = None):
        self.risk = Risk(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed)
        self.space = self.risk.space
        n = self.space.dim
        self.shape, self.dtype, self.device = (n, n), self.space.dtype, self.space.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self._cuda_graphs = cuda_graphs
        self._graphs = GraphCache() if cuda_graphs and self._graph_safe else None
        self._setup()

    @property
    def exact_products(self) -> bool:
        """Whether a product carries no rounding beyond its dtype's that the algorithms cannot see:
        False for bf16/fp16 models and, on CUDA, with TF32 matrix multiplies or (for models with
        convolutions) TF32 cuDNN convolutions. Lanczos then checks its residuals with one direct
        product."""
        if self.dtype in (torch.float16, torch.bfloat16):
            return False
        if self.device.type != "cuda" or self.dtype != torch.float32:
            return True
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return not (torch.backends.cuda.matmul.allow_tf32 or (conv and torch.backends.cudnn.allow_tf32))

    def _options(self) -> dict:
        """The constructor's keyword arguments that rebuild this operator (``blocks`` uses them)."""
        r = self.risk
        return dict(mode=r.mode, reduction=r.reduction, output=r.output, max_batch=r.max_batch,
                    distributed=r.group is not None, cuda_graphs=self._cuda_graphs)

    def _setup(self) -> None:
        """Hook for subclasses, after the data and the loss are checked."""

    # what the operator is of --------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.risk.model

    @property
    def loss_fn(self) -> Any:
        return self.risk.loss_fn

    @property
    def loss(self):
        """The loss spec (:class:`curvkit.model.LossSpec`): its terms, output Hessian, residuals."""
        return self.risk.spec

    @property
    def data(self):
        return self.risk.batches

    @property
    def mode(self) -> str:
        return self.risk.mode

    @property
    def reduction(self) -> str:
        return self.risk.reduction

    @property
    def param_names(self) -> list[str]:
        return self.space.names

    @property
    def param_shapes(self) -> list[torch.Size]:
        return self.space.shapes

    @property
    def num_data(self) -> int:
        """Number of examples in the data (sum of batch sizes, this rank's)."""
        return self.risk.batches.num_data

    def split(self, v: Tensor) -> list[Tensor]:
        """Flat vector (n,) or block (n, k) -> per-parameter tensors (shape ``(*p.shape[, k])``)."""
        return self.space.split(v)

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """Per-parameter tensors (e.g. gradients) -> one flat vector in the operator's order."""
        return self.space.flatten(tensors)

    def blocks(self, by: Literal["layer", "param"] = "layer") -> BlockDiagonalOperator:
        """The diagonal blocks of this operator: one per layer (the module holding the
        parameters, :func:`curvkit.model.layers`; "(root)" for parameters the model holds
        itself) or per parameter, as a :class:`BlockDiagonalOperator` (also a mapping
        ``name -> block``). Each block is this kind of operator built on that block's
        parameters: its products cost a pass over the data like the full operator's.
        """
        if by not in ("layer", "param"):
            raise ArgumentError(f"by must be 'layer' or 'param', got {by!r}")
        if by == "param":
            groups = {n: [n] for n in self.param_names}
        else:
            groups = {layer.name: layer.param_names for layer in find_layers(self.model, self.space.named)}
        return BlockDiagonalOperator({key: self._restricted(names) for key, names in groups.items()})

    def _restricted(self, names: list[str]) -> CurvatureOperator:
        """This operator on some of its parameters, built by its own constructor."""
        return type(self)(self.model, self.loss_fn, self.data, names, **self._options())

    # the data loop ----------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        probes = self.space.probes(V.to(self.dtype))  # (k, *p.shape) each, in the model's dtype
        check = _fingerprint(V) if self.risk.group is not None else None
        params = self.space.tensors

        def batch(x: Any, y: Tensor, i: int):
            if self._graphs is not None:
                prods, loss, w = self._graphs(self._weighted, x, y, probes, i, params)
            else:
                prods, loss, w = self._weighted(x, y, probes, i)
            return [torch.cat([t.reshape(k, -1) for t in prods], dim=1)], loss, w

        totals = self.risk.accumulate(batch, check=check, shapes=[(k, self.space.dim)])
        return totals.mean(totals.sums[0]).T  # float32 for a bf16/fp16 model: summed in float32

    def _weighted(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor, Any]:
        prods, loss, w = self._batch_matmat(x, y, V, index)
        return [p * w for p in prods], loss, w

    def loss_and_gradient(self, on_batch=None) -> tuple[float, Tensor]:
        """The loss over all the data and its gradient (flat, in the operator's order), batches
        weighted exactly as in the curvature products (see :meth:`curvkit.model.Risk.loss_and_gradient`).

        Cost: one forward and one backward pass over the data.
        """
        return self.risk.loss_and_gradient(on_batch)

    def _batch_matmat(self, x: Any, y: Tensor, V: list[Tensor], index: int) -> tuple[list[Tensor], Tensor, Any]:
        """Curvature of batch ``index`` times probes ``V`` (per-parameter, leading dim k).

        Returns the per-parameter products (leading dim k), the batch's loss and its weight
        (``self.risk.weight(outputs, targets)``).
        """
        raise NotImplementedError


def _fingerprint(V: Tensor) -> Tensor:
    """Numbers that differ between different blocks of vectors, compared across ranks: the sum,
    the sum of squares, and a sum of the first entries under irrational weights (random signs
    have equal squares everywhere, and two draws' sums collide a few times in a hundred)."""
    head = V.reshape(-1)[:256].to(torch.float64)
    w = torch.arange(2, head.numel() + 2, dtype=torch.float64, device=V.device).sqrt()
    return torch.stack([V.sum().to(torch.float64), V.square().sum().to(torch.float64), (head * w).sum()])
