r"""Per-example gradients, vmapped: ``g_n = d (sum_t l_t) / d theta`` over example ``n``'s terms.

With the batch loss ``L = c * sum_n sum_{t in n} l_t`` (:mod:`curvkit.model.losses`), the rows
satisfy ``grad L = c * sum_n g_n``: each row is the gradient of the example's own loss with
reduction "sum" (for cross-entropy over tokens, the sum over its tokens that are not
``ignore_index``). Influence functions, EK-FAC and TracIn start from these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ..errors import ModelError
from .data import map_tensors, split_batch
from .params import ParamSpec
from .risk import Mode, Risk


def per_example_gradients(model: nn.Module, loss_fn: Any, batch: Any, params: ParamSpec = None, *,
                          mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                          max_batch: int | None = None) -> Tensor:
    """``(B, n)``: row ``i`` the gradient of example ``i``'s own loss (its terms summed) with
    respect to the chosen parameters, flat in the model's parameter order.

    ``batch`` is one ``(inputs, targets)`` pair (inputs a tensor or a dict of tensors whose
    first dimension is the batch). The examples are differentiated together by ``torch.func.vmap``
    over ``grad``; ``max_batch`` vmaps at most that many at once. A model in ``mode="train"``
    with BatchNorm is refused: its examples would not be independent.

    Cost: about one forward and one backward pass over the batch. Memory: ``B * n`` numbers for
    the result, plus ``max_batch`` (default ``B``) examples' activations at once.

    Example:
        >>> import torch
        >>> from curvkit.model import per_example_gradients
        >>> g = torch.Generator().manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> G = per_example_gradients(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> G.shape                                    # (examples, parameters)
        torch.Size([5, 8])
        >>> loss = torch.nn.CrossEntropyLoss()(model(x), y)   # a mean: grad = (1/5) sum of the rows
        >>> grad = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))])
        >>> torch.allclose(G.sum(0) / 5, grad)
        True
    """
    risk = Risk(model, loss_fn, batch, params, mode=mode, reduction=reduction, output=output,
                max_batch=max_batch, distributed=False)
    if len(risk.batches.sizes) != 1:
        raise ModelError("per_example_gradients takes one (inputs, targets) batch; call it once per batch")
    if mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in risk.model.modules()):
        raise ModelError("BatchNorm in train mode mixes the examples of a batch, so per-example gradients are "
                         "not defined; use mode='eval' (the default)")
    f, spec, space = risk.function(), risk.spec, risk.space
    names = space.names

    def one(params: dict[str, Tensor], x: Any, y: Tensor) -> dict[str, Tensor]:
        xb = _unsqueeze(x)
        return spec.sum_loss(f(params, xb), y[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))
    rows = []
    with risk.in_mode():
        for _, x, y in risk.batches:
            pieces = split_batch(x, y, max_batch) if max_batch else [(x, y)]
            for xs, ys in pieces:
                gs = g(space.detached(), xs, ys)
                rows.append(torch.cat([gs[n].reshape(ys.shape[0], -1) for n in names], dim=1))
    return torch.cat(rows)


def _unsqueeze(x: Any) -> Any:
    """One example of a nest of tensors, given its batch dimension back."""
    return map_tensors(lambda t: t[None], x)


__all__ = ["per_example_gradients"]
