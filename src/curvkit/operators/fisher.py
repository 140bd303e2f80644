"""The Fisher information matrix: empirical or Monte-Carlo."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ArgumentError
from .ggn import OutputSpaceOperator


class FisherOperator(OutputSpaceOperator):
    r"""``F = sum_b w_b c_b sum_n J_n^T r_n r_n^T J_n`` with ``r_n`` the gradient of example n's
    negative log-likelihood with respect to its outputs.

    ``kind="empirical"``: ``r_n`` at the data's targets. ``kind="mc"``: at targets sampled from
    the model's predictive distribution (``mc_samples`` draws per example, averaged), which
    makes ``E[F] = GGN`` for cross-entropy, squared error (a Gaussian of variance 1/2) and
    binary cross-entropy. The samples of batch ``i`` come from a generator seeded by
    ``(seed, i)``, so every product sees the same matrix.

    Cost of ``F @ V`` with V (n, k): as for the GGN, one pass over the data with two forwards
    and one backward per batch.
    """

    def __init__(self, model, loss_fn, data, params=None, *, kind: Literal["empirical", "mc"] = "empirical",
                 mc_samples: int = 1, seed: int | torch.Generator = 0, **kw: Any):
        if kind not in ("empirical", "mc"):
            raise ArgumentError(f"kind must be 'empirical' or 'mc', got {kind!r}")
        if int(mc_samples) < 1:
            raise ArgumentError(f"mc_samples must be >= 1, got {mc_samples}")
        super().__init__(model, loss_fn, data, params, **kw)
        if kind == "mc" and not self.loss.has_likelihood:
            self.loss.sample(torch.zeros(1), torch.Generator())  # raises the LossError that says why
        self.kind, self.mc_samples = kind, int(mc_samples)
        if kind == "mc":
            self._graphs = None  # per-batch sampling uses its own generator: replay eagerly
        self.seed = int(torch.randint(0, 2**62, (1,), generator=seed)) if isinstance(seed, torch.Generator) else int(seed)

    def _output_matmat(self, out: Tensor, y: Tensor, JV: Tensor, index: int) -> Tensor:
        spec, b, k = self.loss, out.shape[0], JV.shape[0]
        if self.kind == "empirical":
            R = spec.residuals(out, y)[None]
        else:
            gen = torch.Generator(device=out.device)
            gen.manual_seed((self.seed * 1_000_003 + index) % 2**64)  # manual_seed takes 64 bits
            R = torch.stack([spec.sampled_residuals(out, y, gen) for _ in range(self.mc_samples)])
        Rf, Jf = R.reshape(R.shape[0], b, -1), JV.reshape(k, b, -1)
        s = torch.einsum("mbd,kbd->kmb", Rf, Jf)
        U = torch.einsum("kmb,mbd->kbd", s, Rf) * (spec.factor(out, y) / R.shape[0])
        return U.reshape(JV.shape)


def fisher(model, loss_fn, data, params=None, kind: Literal["empirical", "mc"] = "empirical", **kw: Any) -> FisherOperator:
    """The Fisher of ``loss_fn(model(inputs), targets)`` over ``data`` (``kind="empirical"|"mc"``).

    Cost to build: one pass over the batches without the model and one forward on the first
    batch. See :class:`FisherOperator`.
    """
    return FisherOperator(model, loss_fn, data, params, kind=kind, **kw)


