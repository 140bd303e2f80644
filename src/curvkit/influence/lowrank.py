r"""Low-rank query gradients (kronfluence's ``query_gradient_low_rank``).

Each Kronecker layer's block of a *preconditioned* query gradient, an ``(out, cols)`` matrix
``P_q``, is replaced by its rank-``r`` truncated SVD ``U_q S_q V_q^T``. A training example's
gradient in that layer is ``M_i = sum_t g_{it} a_{it}^T`` (output gradients ``g``, input rows
``a``, ``T`` rows per example: positions of a sequence or of a convolution), so

    <P_q, M_i> ~= sum_t sum_{k<r} S_{qk} (u_{qk}^T g_{it}) (a_{it}^T v_{qk})

costs ``T r (out + cols)`` per query-example pair instead of ``out * cols``, and never forms
``M_i``. Where that is not cheaper (many positions ``T``: a convolution), ``M_i`` is formed once
per example and the truncated ``P_q`` is used densely; both give the same numbers. Parameters
outside a Kronecker layer (norm affine, embeddings, tied weights, bare parameters) keep their
full gradients. Truncating is the best rank-``r`` approximation of each ``P_q`` in Frobenius
norm; ``r >= min(out, cols)`` reproduces the exact scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..approx.kronecker import input_rows, output_rows
from ..errors import ArgumentError
from ..model.data import split_batch
from ..model.hooks import LayerHooks
from ..model.layers import Layer
from ..model.per_example import per_example_gradients
from ..model.risk import Risk


def check_rank(query_rank: Any) -> int | None:
    if query_rank is None:
        return None
    if not isinstance(query_rank, int) or isinstance(query_rank, bool) or query_rank < 1:
        raise ArgumentError(f"query_rank must be a positive integer or None (full query gradients), got "
                            f"{query_rank!r}; e.g. query_rank=32 keeps each layer's 32 largest singular values")
    return query_rank


class LowRankQueries:
    """A block of ``k`` preconditioned query gradients ``(k, n)`` with each layer in ``layers``
    truncated to rank ``rank``; :meth:`scores` contracts them with a training batch.
    Memory: ``k r (out + cols)`` per layer instead of ``k out cols``."""

    def __init__(self, P: Tensor, layers: list[Layer], risk: Risk, rank: int):
        space, k = risk.space, P.shape[0]
        parts = dict(zip(space.names, (t.reshape(k, *s) for t, s in
                                       zip(P.split([math.prod(s) for s in space.shapes], 1), space.shapes))))
        self.risk, self.layers, self.rank = risk, layers, rank
        self.factors: list[tuple[Tensor, Tensor]] = []
        for layer in layers:
            M = layer.to_matrix([parts[n] for n in layer.kron_params()])
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            r = min(rank, S.shape[-1])
            self.factors.append((U[..., :r] * S[:, None, :r], Vh[:, :r].transpose(1, 2)))  # (k, out, r), (k, cols, r)
        covered = {n for layer in layers for n in layer.param_names}
        self.rest = [n for n in space.names if n not in covered]
        self.P_rest = torch.cat([parts[n].reshape(k, -1) for n in self.rest], 1) if self.rest else None
        self.k = k

    def scores(self, x: Any, y: Tensor) -> Tensor:
        """``(k, B)`` scores against the training batch ``(x, y)``: one forward and backward of
        its summed loss with layer hooks (plus per-example gradients of the other parameters)."""
        r = self.risk
        pieces = split_batch(x, y, r.max_batch) if r.max_batch else [(x, y)]
        return torch.cat([self._piece(xs, ys) for xs, ys in pieces], dim=1)

    def _piece(self, x: Any, y: Tensor) -> Tensor:
        r, n = self.risk, int(y.shape[0])
        dt = self.factors[0][0].dtype if self.factors else self.P_rest.dtype
        S = torch.zeros(self.k, n, dtype=dt, device=r.space.device)
        if self.layers:
            f = r.function()
            params = {name: p.requires_grad_(True) for name, p in r.space.detached().items()}
            with torch.enable_grad(), r.in_mode():
                with LayerHooks(self.layers, grad_targets=True) as rec:
                    out = f(params, x)
                # examples are independent (eval mode), so the summed loss's output gradients
                # are each example's own
                grads = torch.autograd.grad(r.spec.sum_loss(out, y), [rec.targets[la.name] for la in self.layers],
                                            allow_unused=True)
            for layer, g, (US, V) in zip(self.layers, grads, self.factors):
                if g is None:
                    continue
                a, T = input_rows(layer.module, rec.inputs[layer.name])
                a = a[:, layer.columns()].to(dt).reshape(n, T, -1)
                go = output_rows(layer.module, g[None]).to(dt).reshape(n, T, -1)
                out_dim, cols, rank = go.shape[-1], a.shape[-1], US.shape[-1]
                if self.k * T * rank * (out_dim + cols) <= (T + self.k) * out_dim * cols:
                    gu = torch.einsum("nto,kor->nktr", go, US)
                    av = torch.einsum("ntc,kcr->nktr", a, V)
                    S += (gu * av).sum((2, 3)).T
                else:  # many rows per example: form each example's gradient once
                    M = torch.einsum("nto,ntc->noc", go, a)
                    S += torch.einsum("noc,koc->kn", M, US @ V.transpose(1, 2))
        if self.rest:
            G = per_example_gradients(r.model, r.spec, (x, y), self.rest, mode=r.mode, reduction=r.reduction,
                                      output=r.output, max_batch=r.max_batch)
            S += self.P_rest @ G.to(dt).T
        return S


__all__ = ["LowRankQueries", "check_rank"]
