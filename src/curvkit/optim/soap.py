"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam run in the eigenbasis of Shampoo's factors,
the basis refreshed every few steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..approx.matfun import sym_eigh
from ..errors import ArgumentError
from ..model.layers import matrix_shape
from ._base import Staged, check_betas, check_number, check_positive_int, refresh_due, renamed, state_dtype
from ._kron import (KronOptimizer, block_views, ema_factors, matrix_blocks, put_blocks, scatter, stack,
                    state_blocks)
from ._moments import adam_denominator, adam_moments


def _eigenbasis(F: Tensor) -> Tensor:
    """Eigenvectors of stacked factors, eigenvalues descending (the reference's order)."""
    return sym_eigh(F)[1].flip(-1).to(F.dtype)


def _power_qr(F: Tensor, Q: Tensor, v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The reference's refresh: sort ``Q``'s columns by the estimated eigenvalues
    ``diag(Q^T F Q)`` (descending), permute the second moment ``v`` along ``dim`` the same way,
    then one power-iteration step ``Q = qr(F Q)``. Cost: two products and one QR of ``F``'s size."""
    est = ((F @ Q) * Q).sum(-2)  # diag(Q^T F Q)
    idx = est.argsort(dim=-1, descending=True)
    Q = Q.gather(-1, idx.unsqueeze(-2).expand_as(Q))
    v = v.gather(dim, idx.unsqueeze(-1 if dim == -2 else -2).expand_as(v))
    return torch.linalg.qr(F @ Q).Q, v


class SOAP(KronOptimizer):
    r"""SOAP as a ``torch.optim.Optimizer`` (``loss.backward(); opt.step()``), following the
    reference implementation (github.com/nikhilvyas/SOAP).

    For a matrix parameter (conv kernels as ``(out, in*kh*kw)``), cut into blocks of at most
    ``block_size`` per side (see :mod:`curvkit.optim._kron`), with gradient block ``G``:

    - the first step only gathers ``L = (1-sb) G G^T``, ``R = (1-sb) G^T G`` (``sb`` =
      ``shampoo_beta``, or ``betas[1]`` when negative) and takes their eigenbases ``QL, QR``
      (``sym_eigh``, eigenvalues descending); the parameter does not move;
    - then each step ``t = 1, 2, ...``: ``G' = QL^T G QR``; Adam's moments in that basis,
      ``m = b1 m + (1-b1) G'``, ``v = b2 v + (1-b2) G'^2``;
      ``p = (p - lr sqrt(1-b2^t)/(1-b1^t) QL (m / (sqrt(v) + eps)) QR^T) (1 - lr weight_decay)``;
      then ``L, R`` take the EMA with ``G`` (after the update, so the current gradient never
      enters its own projection);
    - every ``every`` steps (``t % every == 0``) the basis is refreshed, by default
      as the reference does (``refresh="qr"``: columns sorted by ``diag(Q^T L Q)``, ``v``
      permuted alike, one power iteration ``Q = qr(L Q)``), or by a fresh ``eigh``
      (``refresh="eigh"``); ``m`` is rotated into the new basis, ``v`` is not (as the reference).

    1-D parameters get plain Adam with the same formula (identity basis) from the first step.
    ``update_each`` is the deprecated name of ``every``.
    Differences from the reference: a conv kernel has two factors, not one per tensor dimension;
    a dimension longer than ``block_size`` is blocked (the reference leaves it unrotated);
    ``m`` is rotated only when the basis changes (the reference rotates it back and forth every
    step, the same up to round-off). State in float32 for bf16/fp16 parameters. A NaN/inf in the
    gradient, a factor, a basis or the update raises ``NonFiniteError`` with parameters and state
    unchanged (one host sync per step for that check).

    >>> import torch
    >>> from curvkit.optim import SOAP
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> inputs = torch.randn(128, 8); labels = inputs[:, :3].argmax(1)
    >>> def loss_now():
    ...     return torch.nn.functional.cross_entropy(net(inputs), labels)
    >>> opt = SOAP(net.parameters(), lr=0.03, every=5)
    >>> start = loss_now().item()
    >>> for _ in range(40):
    ...     opt.zero_grad(); loss_now().backward(); opt.step()
    >>> bool(loss_now().item() < start / 2)
    True

    Cost per step, per ``m x n`` block: two products for the factors (``2mn(m+n)`` flops), four
    for the rotations into and out of the basis (same); every ``every`` steps also two
    products and a QR per factor, plus four products to rotate ``m``; one ``eigh`` per factor on
    the first step only. Blocks of equal shape share every batched call. Extra memory: ``2(m^2 +
    n^2)`` (factors and bases) plus two parameter-sized moments.
    """

    _what = "a SOAP factor, eigenbasis or update"

    def __init__(
        self,
        params: Any,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        every: int = 10,
        block_size: int = 10000,
        refresh: str = "qr",
        update_each: int | None = None,
    ):
        every = renamed("SOAP", "every", every, 10, "update_each", update_each)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
                        shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay, every=every,
                        block_size=block_size, refresh=refresh)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(g: dict) -> None:
        check_number("lr", g["lr"])
        check_betas(g["betas"])
        sb = g["shampoo_beta"]
        if not (isinstance(sb, (int, float)) and not isinstance(sb, bool) and sb < 1):
            raise ArgumentError(f"shampoo_beta must be a number < 1 (negative: use betas[1]), got {sb!r}")
        check_number("eps", g["eps"])
        check_number("weight_decay", g["weight_decay"])
        check_positive_int("every", g["every"])
        check_positive_int("block_size", g["block_size"])
        if g["refresh"] not in ("qr", "eigh"):
            raise ArgumentError(f"refresh must be 'qr' (one power iteration, the reference) or 'eigh', "
                                f"got {g['refresh']!r}")

    def _prepare(self, group: dict, new: Staged) -> None:
        """Everything new of one group, staged in ``new`` (written by the protocol's commit)."""
        params = [p for p in group["params"] if p.grad is not None]
        b1, b2 = group["betas"]
        sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2
        bs, eps = group["block_size"], group["eps"]
        states = self._init_state(params, bs, new)
        g = [p.grad.to(state_dtype(p)) for p in params]
        dirs: dict = {}

        # 1-D parameters: Adam, foreach over all of them
        vec = [i for i, p in enumerate(params) if matrix_shape(p.shape) is None]
        if vec:
            ts = [states[i]["step"] + 1 for i in vec]
            m_old, v_old = [states[i]["exp_avg"] for i in vec], [states[i]["exp_avg_sq"] for i in vec]
            m_new, v_new = adam_moments([g[i] for i in vec], m_old, v_old, b1, b2)
            new.replace([*m_old, *v_old], [*m_new, *v_new])
            # the reference's bias correction: eps is added to sqrt(v) before sqrt(1 - b2^t) scales it
            d = torch._foreach_mul(torch._foreach_div(m_new, adam_denominator(v_new, None, b2, eps)),
                                   [(1 - b2**t) ** 0.5 / (1 - b1**t) for t in ts])
            dirs.update(zip(vec, d))
            for i, t in zip(vec, ts):
                new.put(states[i], "step", t)

        # matrix blocks; phase "init" (first sight: factors and eigenbases only, no step) or the step t
        phase = lambda i: "init" if "QL0" not in states[i] else states[i]["step"] + 1  # noqa: E731
        bufs, buckets = matrix_blocks(params, g, bs, phase)
        ea, sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        stepped = {}
        for (_, t, _, _), bucket in buckets.items():
            G = stack(block_views(g, bucket))
            L, R = ema_factors(new, states, bucket, G, sb)
            if t == "init":
                put_blocks(new, states, bucket, "QL", _eigenbasis(L))
                put_blocks(new, states, bucket, "QR", _eigenbasis(R))
                continue
            QL, QR = stack(state_blocks(states, bucket, "QL")), stack(state_blocks(states, bucket, "QR"))
            Gp = QL.transpose(-1, -2) @ G @ QR
            m_old, v_old = block_views(ea, bucket), block_views(sq, bucket)
            (m,), (v,) = adam_moments([Gp], [stack(m_old)], [stack(v_old)], b1, b2)
            (denom,) = adam_denominator([v], None, b2, eps)
            D = QL @ (m / denom) @ QR.transpose(-1, -2)
            D = D * ((1 - b2**t) ** 0.5 / (1 - b1**t))
            if refresh_due(t, group["every"]):  # t >= 1
                E = QL @ m @ QR.transpose(-1, -2)  # m back in the original basis
                if group["refresh"] == "qr":
                    QL, v = _power_qr(L, QL, v, -2)
                    QR, v = _power_qr(R, QR, v, -1)
                else:
                    QL, QR = _eigenbasis(L), _eigenbasis(R)
                m = QL.transpose(-1, -2) @ E @ QR
                new.replace(state_blocks(states, bucket, "QL") + state_blocks(states, bucket, "QR"),
                            [*QL.unbind(0), *QR.unbind(0)])
            new.replace(m_old + v_old, [*m.unbind(0), *v.unbind(0)])
            scatter(D, bucket, params, bufs, dirs)
            stepped.update((i, t) for i, _, _ in bucket)
        for i, t in stepped.items():
            new.put(states[i], "step", t)
        # the reference's order: the step, then decoupled weight decay on the result
        new.move([params[i] for i in dirs], list(dirs.values()), lr=group["lr"], weight_decay=group["weight_decay"],
                 decay_first=False)
