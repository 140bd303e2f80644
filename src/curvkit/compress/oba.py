r"""Optimal Brain Apoptosis (Chen et al., ICLR 2025): the importance of a structured group is the
second-order Taylor change of the loss when the group is removed,

.. math:: \Delta L_s = g^\top \delta_s + \tfrac12\, \delta_s^\top H \delta_s,
   \qquad \delta_s = -\theta_s ,

where :math:`\theta_s` holds the group's weights in every layer it touches (the producer's rows,
a BatchNorm's entries, the consumer's columns; zero elsewhere), :math:`g` the gradient and
:math:`H` the Hessian (or the GGN) of the loss over the data. :math:`\delta_s^\top H \delta_s`
includes the cross-layer blocks between the producer and the consumer (and any layer between),
which is what distinguishes OBA from a layer-wise (block-diagonal) saliency.

The quadratic terms come from Hessian-vector products: exactly, one product per group in blocks of
probes, or, under a budget smaller than the number of groups, from Rademacher combinations of
the group directions: with :math:`\varepsilon_t = \pm 1`,
:math:`\varepsilon_s\, \delta_s^\top H \sum_t \varepsilon_t \delta_t` is unbiased for
:math:`\delta_s^\top H \delta_s` (the cross terms have mean zero); the mean over the probes is
returned with its standard error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, NonFiniteError
from ..operators import ggn, hessian
from ..progress import progress as progress_bar
from ..seeding import generator
from .structured import GroupSet, group_indices

BLOCK = 32  # probes per pass over the data


@dataclass
class OBAScores:
    """Per group set (in the order given), the predicted loss changes ``scores`` (float64, one per
    unit), their gradient and quadratic parts, and the scores' standard error (``None``
    when exact). ``matvecs``: Hessian-vector products used; ``exact``: one product per group."""

    scores: list[Tensor]
    gradient_term: list[Tensor]
    quadratic: list[Tensor]
    stderr: list[Tensor] | None
    matvecs: int
    exact: bool


def _params_of(model: nn.Module, sets: list[GroupSet]) -> list[str]:
    touched = {p for s in sets for p, _, _ in s.members(model)}
    return [n for n, p in model.named_parameters() if n in touched and p.requires_grad]


def oba_scores(model: nn.Module, loss_fn: Any, data: Any, sets: list[GroupSet], *, curvature: str = "hessian",
               max_matvecs: int | None = None, seed: Any = 0, max_batch: int | None = None,
               progress: bool | None = None) -> OBAScores:
    """The OBA score of every group of ``sets`` (from :func:`curvkit.compress.structured.find_groups`).

    The curvature is over the trainable parameters the groups touch (all their layers, so the
    cross-layer blocks are in); the slices of frozen parameters are left out of the directions. ``max_matvecs=None`` or at least the number of groups ``S``: exact, one
    product per group. Fewer: ``max_matvecs`` (at least 2) randomized products, each giving an
    unbiased estimate of every group's quadratic term, averaged, with the standard error.

    Cost: one pass over the data for the gradient, then ``S`` (exact) or ``max_matvecs`` products
    in blocks of 32 probes (a pass over the data per block). Memory: the touched parameters times
    32 probes, twice.
    """
    if curvature not in ("hessian", "ggn"):
        raise ArgumentError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    names = _params_of(model, sets)
    op = (hessian if curvature == "hessian" else ggn)(model, loss_fn, data, names, max_batch=max_batch)
    _, g = op.loss_and_gradient()
    theta = op.flatten([p.detach() for p in op.space.tensors])
    idx = group_indices(model, sets, names)
    S, n = len(idx), theta.shape[0]
    owner = torch.cat([torch.full((len(i),), j, dtype=torch.long) for j, i in enumerate(idx)]).to(theta.device)
    flat = torch.cat(idx).to(theta.device)
    vals = -theta[flat]  # delta_s = -theta_s, entry by entry
    grad_term = torch.zeros(S, dtype=torch.float64, device=theta.device).index_add_(
        0, owner, (g[flat] * vals).to(torch.float64))
    exact = max_matvecs is None or max_matvecs >= S
    if not exact and max_matvecs < 2:
        raise ArgumentError(f"max_matvecs={max_matvecs} is below the number of groups ({S}) and a randomized "
                            "estimate needs at least 2 products for its standard error; raise it")
    total = S if exact else int(max_matvecs)
    bar = progress_bar(total, "OBA products", progress)
    if exact:
        quad = torch.zeros(S, dtype=torch.float64, device=theta.device)
        for a in range(0, S, BLOCK):
            b = min(S, a + BLOCK)
            sel = (owner >= a) & (owner < b)
            cols = owner[sel] - a
            D = torch.zeros(n, b - a, dtype=theta.dtype, device=theta.device)
            D[flat[sel], cols] = vals[sel]
            HD = op @ D
            quad[a:b] = torch.zeros(b - a, dtype=torch.float64, device=theta.device).index_add_(
                0, cols, (vals[sel] * HD[flat[sel], cols]).to(torch.float64))
            bar.update(b - a)
        stderr = None
    else:
        gen = generator(seed)
        samples = []
        for a in range(0, total, BLOCK):
            k = min(total, a + BLOCK) - a
            eps = (torch.randint(0, 2, (S, k), generator=gen) * 2 - 1).to(theta.dtype).to(theta.device)
            V = torch.zeros(n, k, dtype=theta.dtype, device=theta.device)
            V.index_add_(0, flat, vals[:, None] * eps[owner])
            HV = op @ V
            dots = torch.zeros(S, k, dtype=torch.float64, device=theta.device).index_add_(
                0, owner, (vals[:, None] * HV[flat]).to(torch.float64))
            samples.append(eps.to(torch.float64) * dots)
            bar.update(k)
        est = torch.cat(samples, dim=1)
        quad = est.mean(1)
        stderr_all = est.std(1) / total ** 0.5
    bar.close()
    scores = grad_term + 0.5 * quad
    if not torch.isfinite(scores).all():
        raise NonFiniteError("OBA scores are not finite (the gradient or a Hessian-vector product overflowed); "
                             "check the loss on the data, or use curvature='ggn' in float64")
    sizes = [s.units for s in sets]

    def per_set(t: Tensor) -> list[Tensor]:
        return [c.cpu() for c in t.split(sizes)]

    return OBAScores(per_set(scores), per_set(grad_term), per_set(quad),
                     None if exact else per_set(0.5 * stderr_all), total, exact)


__all__ = ["oba_scores", "OBAScores"]
