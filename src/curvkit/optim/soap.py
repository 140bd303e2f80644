"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam run in the eigenbasis of Shampoo's factors,
the basis refreshed every few steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..approx.matfun import sym_eigh
from ..errors import ArgumentError
from ._base import check_betas, check_number, check_positive_int, state_dtype
from ._kron import KronOptimizer, Staged, block_views, matrix_blocks, matrix_shape, scatter, stack, state_blocks


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
    - every ``update_each`` steps (``t % update_each == 0``) the basis is refreshed, by default
      as the reference does (``refresh="qr"``: columns sorted by ``diag(Q^T L Q)``, ``v``
      permuted alike, one power iteration ``Q = qr(L Q)``), or by a fresh ``eigh``
      (``refresh="eigh"``); ``m`` is rotated into the new basis, ``v`` is not (as the reference).

    1-D parameters get plain Adam with the same formula (identity basis) from the first step.
    Differences from the reference: a conv kernel has two factors, not one per tensor dimension;
    a dimension longer than ``block_size`` is blocked (the reference leaves it unrotated);
    ``m`` is rotated only when the basis changes (the reference rotates it back and forth every
    step, the same up to round-off). State in float32 for bf16/fp16 parameters. A NaN/inf in the
    gradient, a factor, a basis or the update raises ``NonFiniteError`` with parameters and state
    unchanged (one host sync per step for that check).

    >>> import torch
    >>> from curvkit.optim import SOAP
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(8, 3)
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = SOAP(model.parameters(), lr=0.05, update_each=5)
    >>> losses = []
    >>> for _ in range(40):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    ...     losses.append(loss.item())
    >>> bool(losses[-1] < losses[0] / 2)
    True

    Cost per step, per ``m x n`` block: two products for the factors (``2mn(m+n)`` flops), four
    for the rotations into and out of the basis (same); every ``update_each`` steps also two
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
        update_each: int = 10,
        block_size: int = 10000,
        refresh: str = "qr",
    ):
        check_number("lr", lr)
        check_betas(betas)
        if not (isinstance(shampoo_beta, (int, float)) and not isinstance(shampoo_beta, bool)
                and shampoo_beta < 1):
            raise ArgumentError(f"shampoo_beta must be a number < 1 (negative: use betas[1]), got {shampoo_beta!r}")
        check_number("eps", eps)
        check_number("weight_decay", weight_decay)
        check_positive_int("update_each", update_each)
        check_positive_int("block_size", block_size)
        if refresh not in ("qr", "eigh"):
            raise ArgumentError(f"refresh must be 'qr' (one power iteration, the reference) or 'eigh', got {refresh!r}")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        update_each=update_each, block_size=block_size, refresh=refresh)
        super().__init__(params, defaults)

    def _extra_state(self) -> dict:
        return {"version": 1}

    def _prepare(self, group: dict) -> Staged:
        """Everything new of one group, out of place (written by ``Staged.commit``)."""
        params = [p for p in group["params"] if p.grad is not None]
        b1, b2 = group["betas"]
        sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2
        bs, eps = group["block_size"], group["eps"]
        self._init_state(params, bs)
        states = [self.state[p] for p in params]
        g = [p.grad.to(state_dtype(p)) for p in params]
        # the reference's order: the step, then decoupled weight decay on the result
        new = Staged(group["lr"], group["weight_decay"], decay_first=False)
        dirs: dict = {}

        # 1-D parameters: Adam, foreach over all of them
        vec = [i for i, p in enumerate(params) if matrix_shape(p.shape) is None]
        if vec:
            ts = [states[i]["step"] + 1 for i in vec]
            m_old, v_old = [states[i]["exp_avg"] for i in vec], [states[i]["exp_avg_sq"] for i in vec]
            gv = [g[i] for i in vec]
            m_new = torch._foreach_lerp(m_old, gv, 1 - b1)
            v_new = torch._foreach_lerp(v_old, torch._foreach_mul(gv, gv), 1 - b2)
            new.replace([*m_old, *v_old], [*m_new, *v_new])
            denom = torch._foreach_add(torch._foreach_sqrt(v_new), eps)
            d = torch._foreach_mul(torch._foreach_div(m_new, denom), [(1 - b2**t) ** 0.5 / (1 - b1**t) for t in ts])
            dirs.update(zip(vec, d))
            for i, t in zip(vec, ts):
                new.count(states[i], t)

        # matrix blocks; phase "init" (first sight: factors and eigenbases only, no step) or the step t
        phase = lambda i: "init" if "QL0" not in states[i] else states[i]["step"] + 1  # noqa: E731
        bufs, buckets = matrix_blocks(params, g, bs, phase)
        ea, sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        stepped = {}
        for (_, t, _, _), bucket in buckets.items():
            G = stack(block_views(g, bucket))
            L, R = new.ema_factors(states, bucket, G, sb)
            if t == "init":
                new.put(states, bucket, "QL", _eigenbasis(L))
                new.put(states, bucket, "QR", _eigenbasis(R))
                continue
            QL, QR = stack(state_blocks(states, bucket, "QL")), stack(state_blocks(states, bucket, "QR"))
            Gp = QL.transpose(-1, -2) @ G @ QR
            m_old, v_old = block_views(ea, bucket), block_views(sq, bucket)
            m = torch.lerp(stack(m_old), Gp, 1 - b1)
            v = torch.lerp(stack(v_old), Gp * Gp, 1 - b2)
            D = QL @ (m / (v.sqrt() + eps)) @ QR.transpose(-1, -2)
            D = D * ((1 - b2**t) ** 0.5 / (1 - b1**t))
            if t % group["update_each"] == 0:
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
            new.count(states[i], t)
        new.update(params, dirs)
        return new

