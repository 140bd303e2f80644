"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam run in the eigenbasis of Shampoo's factors,
the basis refreshed every few steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..approx.matfun import sym_eigh
from ..errors import ArgumentError
from ._base import check_betas, check_number, check_positive_int, state_dtype
from ._kron import (KronOptimizer, apply_update, block_shape, block_slices, copy_all, factor_ema, group_by,
                    matrix_shape, stack)


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

    def _prepare(self, group: dict) -> tuple[list[Tensor], Any]:
        """Everything new of one group, out of place: (tensors to check, commit function)."""
        params = [p for p in group["params"] if p.grad is not None]
        b1, b2 = group["betas"]
        sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2
        bs, eps = group["block_size"], group["eps"]
        self._init_state(params, bs)
        states = [self.state[p] for p in params]
        g = [p.grad.to(state_dtype(p)) for p in params]
        check, dst, src, slots = [], [], [], []  # slots: (state, key, value) for keys that may not exist
        upd_params, dirs, steps = [], [], []

        # 1-D parameters: Adam, foreach over all of them
        vec = [i for i, p in enumerate(params) if matrix_shape(p.shape) is None]
        if vec:
            ts = [states[i]["step"] + 1 for i in vec]
            m_old, v_old = [states[i]["exp_avg"] for i in vec], [states[i]["exp_avg_sq"] for i in vec]
            gv = [g[i] for i in vec]
            m_new = torch._foreach_lerp(m_old, gv, 1 - b1)
            v_new = torch._foreach_lerp(v_old, torch._foreach_mul(gv, gv), 1 - b2)
            denom = torch._foreach_add(torch._foreach_sqrt(v_new), eps)
            d = torch._foreach_mul(torch._foreach_div(m_new, denom), [(1 - b2**t) ** 0.5 / (1 - b1**t) for t in ts])
            check += [*m_new, *v_new, *d]
            dst += [*m_old, *v_old]
            src += [*m_new, *v_new]
            upd_params += [params[i] for i in vec]
            dirs += d
            steps += [(states[i], t) for i, t in zip(vec, ts)]

        # matrix blocks, bucketed by (shape, phase, dtype, device); phase: "init" or the step t
        entries, mats = [], {}
        for i, p in enumerate(params):
            if (mn := matrix_shape(p.shape)) is not None:
                blocks = block_slices(*mn, bs)
                entries += [(i, j, blk) for j, blk in enumerate(blocks)]
                st = states[i]
                mats[i] = (g[i].reshape(mn), st["exp_avg"].view(mn), st["exp_avg_sq"].view(mn),
                           torch.empty(mn, dtype=g[i].dtype, device=g[i].device) if len(blocks) > 1 else None)
        phase = lambda i: "init" if "QL0" not in states[i] else states[i]["step"] + 1  # noqa: E731
        key = lambda e: (block_shape(e[2]), phase(e[0]), g[e[0]].dtype, g[e[0]].device)  # noqa: E731
        new_dirs = {}
        for (_, t, _, _), bucket in group_by(entries, key).items():
            G = stack([mats[i][0][blk] for i, _, blk in bucket])
            L, R = factor_ema(stack([states[i][f"L{j}"] for i, j, _ in bucket]),
                              stack([states[i][f"R{j}"] for i, j, _ in bucket]), G, sb)
            check += [L, R]
            dst += [states[i][f"{f}{j}"] for f in "LR" for i, j, _ in bucket]
            src += [*L.unbind(0), *R.unbind(0)]
            if t == "init":
                QL, QR = _eigenbasis(L), _eigenbasis(R)
                check += [QL, QR]
                slots += [(states[i], f"{f}{j}", X[k]) for f, X in (("QL", QL), ("QR", QR))
                          for k, (i, j, _) in enumerate(bucket)]
                continue
            QL = stack([states[i][f"QL{j}"] for i, j, _ in bucket])
            QR = stack([states[i][f"QR{j}"] for i, j, _ in bucket])
            Gp = QL.transpose(-1, -2) @ G @ QR
            m = torch.lerp(stack([mats[i][1][blk] for i, _, blk in bucket]), Gp, 1 - b1)
            v = torch.lerp(stack([mats[i][2][blk] for i, _, blk in bucket]), Gp * Gp, 1 - b2)
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
                check += [QL, QR]
                dst += [states[i][f"{f}{j}"] for f in ("QL", "QR") for i, j, _ in bucket]
                src += [*QL.unbind(0), *QR.unbind(0)]
            check += [m, v, D]
            dst += [mats[i][c][blk] for c in (1, 2) for i, _, blk in bucket]
            src += [*m.unbind(0), *v.unbind(0)]
            for k, (i, _, blk) in enumerate(bucket):
                new_dirs.setdefault(i, t)
                if mats[i][3] is None:
                    dirs.append(D[k].view(params[i].shape))
                    upd_params.append(params[i])
                else:
                    mats[i][3][blk].copy_(D[k])
        for i, t in new_dirs.items():
            steps.append((states[i], t))
            if mats[i][3] is not None:
                dirs.append(mats[i][3].view(params[i].shape))
                upd_params.append(params[i])

        def commit() -> None:
            for st, k, x in slots:
                st[k] = torch.empty_like(x)
            copy_all(dst + [st[k] for st, k, _ in slots], src + [x for _, _, x in slots])
            for st, t in steps:
                st["step"] = t
            if upd_params:
                # the reference's order: the step, then decoupled weight decay on the result
                apply_update(upd_params, dirs, group["lr"], group["weight_decay"], decay_first=False)

        return check, commit

