"""Shampoo (Gupta et al. 2018) in the form of Distributed Shampoo (Shi et al. 2023): Kronecker
factors of the gradient, inverse fourth roots refreshed every few steps, the step size grafted
from Adam block by block."""

from __future__ import annotations

from typing import Any

import torch

from ..approx.matfun import inverse_root
from ..errors import ArgumentError
from ._base import Staged, check_betas, check_number, check_positive_int, refresh_due, renamed, state_dtype
from ._kron import (KronOptimizer, block_views, ema_factors, matrix_blocks, put_blocks, scatter, stack,
                    state_blocks)
from ._moments import adam_denominator, adam_moments, bias_corrected


class Shampoo(KronOptimizer):
    r"""Shampoo with Adam grafting as a ``torch.optim.Optimizer`` (``loss.backward(); opt.step()``).

    For a matrix parameter (conv kernels as ``(out, in*kh*kw)``), cut into blocks of at most
    ``block_size`` per side (see :mod:`curvkit.optim._kron`), with gradient block ``G``, step
    ``t`` and ``b1, b2 = betas``:

    - ``L = b2 L + (1-b2) G G^T``, ``R = b2 R + (1-b2) G^T G`` (every step);
    - every ``every`` steps from ``start_preconditioning_step`` on, the roots
      ``(L/(1-b2^t) + epsilon I)^(-1/4)`` and the same of ``R`` (``root_method`` "eigh" or
      "newton", :func:`curvkit.approx.matfun.inverse_root`);
    - ``m = b1 m + (1-b1) g``, direction ``D = L^(-1/4) (m/(1-b1^t)) R^(-1/4)`` per block;
    - ``graft="adam"``: ``D`` rescaled to the Frobenius norm of Adam's direction
      ``m_hat / (sqrt(v_hat) + graft_eps)`` on the same block (``v`` the EMA of ``g^2`` with
      ``b2``); ``graft="none"``: ``D`` as is;
    - ``p = p (1 - lr weight_decay) - lr D`` (decoupled weight decay).

    Before the first roots exist (steps ``< start_preconditioning_step``, default
    ``every``), and always for 1-D parameters, the direction is Adam's.
    Hyperparameters per param group (``update_each`` is the deprecated name of ``every``);
    state in float32 for bf16/fp16 parameters. A NaN/inf in
    the gradient, a factor, a root or the update raises ``NonFiniteError`` with parameters and
    state unchanged (one host sync per step for that check).

    >>> import torch
    >>> from curvkit.optim import Shampoo
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(8, 3)
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = Shampoo(model.parameters(), lr=0.05, every=5)
    >>> losses = []
    >>> for _ in range(40):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    ...     losses.append(loss.item())
    >>> bool(losses[-1] < losses[0] / 2)
    True

    Cost per step, per ``m x n`` block: two products for the factors (``2mn(m+n)`` flops) and two
    for the direction (same); every ``every`` steps also one batched ``eigh`` of the
    ``m x m`` and of the ``n x n`` factors (or ~``iters`` x 6 products with "newton"). Blocks of
    equal shape share every batched call. Extra memory: ``m^2 + n^2`` for the factors and as
    much for the roots, plus two parameter-sized moments.
    """

    _what = "a Shampoo factor, root or update"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        every: int = 10,
        start_preconditioning_step: int | None = None,
        block_size: int = 1024,
        graft: str = "adam",
        graft_eps: float = 1e-8,
        root_method: str = "eigh",
        update_each: int | None = None,
    ):
        every = renamed("Shampoo", "every", every, 10, "update_each", update_each)
        check_positive_int("every", every)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, epsilon=epsilon,
                        weight_decay=weight_decay, every=every,
                        start_preconditioning_step=every if start_preconditioning_step is None
                        else start_preconditioning_step,
                        block_size=block_size, graft=graft, graft_eps=graft_eps, root_method=root_method)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(g: dict) -> None:
        check_number("lr", g["lr"])
        check_betas(g["betas"])
        check_number("epsilon", g["epsilon"], strict=True)  # 0 would invert the zero eigenvalues of a rank-deficient factor
        check_number("weight_decay", g["weight_decay"])
        check_number("graft_eps", g["graft_eps"])
        check_positive_int("every", g["every"])
        check_positive_int("block_size", g["block_size"])
        check_positive_int("start_preconditioning_step", g["start_preconditioning_step"])
        if g["graft"] not in ("adam", "none"):
            raise ArgumentError(f"graft must be 'adam' (Adam's norm per block) or 'none', got {g['graft']!r}")
        if g["root_method"] not in ("eigh", "newton"):
            raise ArgumentError(f"root_method must be 'eigh' or 'newton', got {g['root_method']!r}")

    def _prepare(self, group: dict, new: Staged) -> None:
        """Everything new of one group, staged in ``new`` (written by the protocol's commit)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        b1, b2 = group["betas"]
        bs, start, every = group["block_size"], group["start_preconditioning_step"], group["every"]
        states = self._init_state(params, bs, new)
        ts = [st["step"] + 1 for st in states]
        g = [p.grad.to(state_dtype(p)) for p in params]
        m_old, v_old = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        m_new, v_new = adam_moments(g, m_old, v_old, b1, b2)
        new.replace([*m_old, *v_old], [*m_new, *v_new])
        adam = torch._foreach_div(bias_corrected(m_new, ts, b1), adam_denominator(v_new, ts, b2, group["graft_eps"]))
        dirs = dict(enumerate(adam))  # matrix blocks replace theirs once they have roots

        bufs, buckets = matrix_blocks(params, g, bs, phase=lambda i: ts[i])
        for (_, t, _, _), bucket in buckets.items():
            L, R = ema_factors(new, states, bucket, stack(block_views(g, bucket)), b2)
            if t < start:
                continue
            if refresh_due(t, every, start) or any(f"Lroot{j}" not in states[i] for i, j, _ in bucket):
                c = 1 - b2**t
                Lr, Rr = (inverse_root(F / c, 4, group["epsilon"], group["root_method"]).to(F.dtype) for F in (L, R))
                put_blocks(new, states, bucket, "Lroot", Lr)
                put_blocks(new, states, bucket, "Rroot", Rr)
            else:
                Lr, Rr = stack(state_blocks(states, bucket, "Lroot")), stack(state_blocks(states, bucket, "Rroot"))
            D = torch.bmm(torch.bmm(Lr, stack(block_views(m_new, bucket))), Rr)
            if group["graft"] == "adam":
                na = torch.linalg.vector_norm(stack(block_views(adam, bucket)), dim=(-2, -1), keepdim=True)
                nd = torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True)
                D = D * (na / nd.clamp_min(torch.finfo(D.dtype).tiny))
            elif b1:
                D = D / (1 - b1**t)  # the bias-corrected momentum
            scatter(D, bucket, params, bufs, dirs)
        for st, t in zip(states, ts):
            new.put(st, "step", t)
        new.move([params[i] for i in dirs], list(dirs.values()), lr=group["lr"], weight_decay=group["weight_decay"])
