"""The Fisher information matrix: empirical or Monte-Carlo."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..seeding import seed_int
from ..errors import ArgumentError
from ..model.params import ParamSpec
from ..model.risk import Mode
from .ggn import OutputSpaceOperator

Kind = Literal["empirical", "mc"]


class FisherOperator(OutputSpaceOperator):
    r"""``F = sum_b w_b c_b sum_t J_t^T r_t r_t^T J_t`` over the loss's terms ``t``, with ``r_t``
    the gradient of term t's negative log-likelihood with respect to its outputs.

    A term is what the loss's mean counts (:mod:`curvkit.model.losses`): one example of an
    ``(N, C)`` classifier or regressor, one token (position) of a sequence loss, so the same
    loss spelled on ``(B, V, T)`` or on ``(B*T, V)`` gives the same Fisher.
    ``kind="empirical"``: ``r_t`` at the data's targets. ``kind="mc"``: at targets sampled from
    the model's predictive distribution (``mc_samples`` draws per term, averaged), which makes
    ``E[F] = GGN`` for cross-entropy, squared error (a Gaussian of variance 1/2) and binary
    cross-entropy. The samples of batch ``i`` come from a generator seeded by ``(seed, i)``
    (the pieces ``max_batch`` cuts it into continue that one stream), so every product sees the
    same matrix; ``seed=None`` draws one seed from fresh entropy.

    Cost of ``F @ V`` with V (n, k): as for the GGN, one pass over the data with two forwards
    and one backward per batch.

    Example:
        >>> import torch, curvkit as ck
        >>> from curvkit.model import per_example_gradients
        >>> g = torch.Generator().manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
        >>> F = ck.fisher(model, torch.nn.CrossEntropyLoss(), (x, y))   # kind="empirical"
        >>> rows = per_example_gradients(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> torch.allclose(F.dense(), rows.T @ rows / 8)   # one term per example, mean: c = 1/8
        True
        >>> Fmc = ck.fisher(model, torch.nn.CrossEntropyLoss(), (x, y), kind="mc", seed=0)
        >>> torch.equal(Fmc.dense(), Fmc.dense())          # one fixed draw per seed
        True
    """

    _what = "the Fisher"

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 kind: Kind = "empirical", mc_samples: int = 1, seed: int | torch.Generator | None = 0,
                 mode: Mode = "eval", reduction: str | None = None, output: Any = None,
                 max_batch: int | None = None, distributed: bool | None = None, cuda_graphs: bool | None = None):
        if kind not in ("empirical", "mc"):
            raise ArgumentError(f"kind must be 'empirical' or 'mc', got {kind!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ArgumentError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed_int(seed)
        if kind == "mc":
            self._graph_safe = False  # per-batch sampling uses its own generator: replay eagerly
        super().__init__(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed, cuda_graphs=cuda_graphs)

    def _options(self) -> dict:
        return {**super()._options(), "kind": self.kind, "mc_samples": self.mc_samples, "seed": self.seed}

    def _check_loss(self, out: Tensor, y: Tensor) -> None:
        if self.kind == "mc" and not self.loss.has_likelihood:
            self.loss.sample(out, torch.Generator())  # raises the LossError that says why

    def _output_matmat(self, out: Tensor, y: Tensor, JV: Tensor, index: int) -> Tensor:
        spec = self.loss
        gen = None if self.kind == "empirical" else self.risk.batch_generator(self.seed, index, out.device)
        R = spec.residual_draws(out, y, self.kind, gen, self.mc_samples)
        return spec.fisher_matmat(out, R, JV, spec.factor(out, y))


def fisher(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, kind: Kind = "empirical",
           mc_samples: int = 1, seed: int | torch.Generator | None = 0, mode: Mode = "eval",
           reduction: str | None = None, output: Any = None, max_batch: int | None = None,
           distributed: bool | None = None, cuda_graphs: bool | None = None) -> FisherOperator:
    """The Fisher of ``loss_fn(model(inputs), targets)`` over ``data`` (``kind="empirical"|"mc"``).

    Cost to build: one pass over the batches without the model and two forwards on the first
    batch. See :class:`FisherOperator`.
    """
    return FisherOperator(model, loss_fn, data, params, kind=kind, mc_samples=mc_samples, seed=seed, mode=mode,
                          reduction=reduction, output=output, max_batch=max_batch, distributed=distributed,
                          cuda_graphs=cuda_graphs)
