r"""M-FAC (Frantar, Kurtic & Alistarh 2021) as an optimizer: the gradient preconditioned by the
inverse of the empirical Fisher over a sliding window of the last ``window`` gradients,
``(damping I + (1/m) sum_i g_i g_i^T)^-1 g``, through the one M-FAC implementation
(:mod:`curvkit.approx.mfac`: Woodbury with a Cholesky factor of ``damping m I + G G^T``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..approx.mfac import gram_row, inverse_matmat, woodbury_factor
from ._base import CurvkitOptimizer, Staged, check_number, check_positive_int, state_dtype
from ._moments import heavy_ball


class MFAC(CurvkitOptimizer):
    r"""M-FAC as a ``torch.optim.Optimizer`` (``loss.backward(); opt.step()``).

    Each param group keeps one window over its parameters' concatenated gradients (``g`` the
    flat gradient of the group, zeros for parameters without one). A step:

    - ``g`` enters the window, replacing the oldest of the last ``window`` gradients;
    - ``d = F^-1 g`` with ``F = damping I + (1/n) sum_i g_i g_i^T`` over the ``n <= window``
      gradients held (this one included): the natural-gradient direction of the windowed
      empirical Fisher, exact for that matrix (:func:`curvkit.approx.mfac.inverse_matmat`);
    - ``b = momentum b + d`` (heavy ball; ``momentum=0``: ``b = d``);
    - ``p = p (1 - lr weight_decay) - lr b`` (decoupled weight decay).

    ``F^-1 g`` has roughly the scale of ``n g / |g|^2`` along new directions, so the learning
    rate is not Adam's or SGD's: sweep it. Hyperparameters per param group; state (window,
    Gram matrix, counters, momentum) in the group's first parameter's state, float32 for
    bf16/fp16 parameters; ``window`` is fixed once a group's window exists. A NaN/inf in the
    gradient or the direction raises ``NonFiniteError`` with parameters and state unchanged.

    >>> import torch
    >>> from curvkit.optim import MFAC
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(8, 3)
    >>> x = torch.randn(128, 8); y = x[:, :3].argmax(1)
    >>> opt = MFAC(model.parameters(), lr=0.03, window=8, damping=1e-2)
    >>> losses = []
    >>> for _ in range(40):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    ...     losses.append(loss.item())
    >>> bool(losses[-1] < losses[0] / 2)
    True

    Cost per step, per group of ``d`` parameters and ``n`` gradients held: ``3 n d``
    multiply-adds (the new Gram row and the two window products), a float64 Cholesky of an
    ``n x n`` matrix (``n^3/3`` flops) and a copy of the window (out of place, so that a failed
    step changes nothing). Memory: ``window * d`` numbers for the window, plus ``d`` for
    momentum.
    """

    _what = "the M-FAC window or direction"

    def __init__(self, params: Any, lr: float = 1e-2, window: int = 32, damping: float = 1e-2,
                 weight_decay: float = 0.0, momentum: float = 0.0):
        defaults = dict(lr=lr, window=window, damping=damping, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(g: dict) -> None:
        check_number("lr", g["lr"])
        check_positive_int("window", g["window"])
        check_number("damping", g["damping"], strict=True)
        check_number("weight_decay", g["weight_decay"])
        check_number("momentum", g["momentum"], high=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step from ``p.grad`` (``closure``: torch's convention, it calls ``backward``
        and returns the loss, which is returned)."""
        return self._step_groups(closure)

    def _prepare(self, group: dict, new: Staged) -> None:
        params = group["params"]
        moving = [p for p in params if p.grad is not None]
        if not moving:
            return
        p0 = params[0]
        dt = state_dtype(p0)
        st = self._staged_state(p0, new)
        d = sum(p.numel() for p in params)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dt) for p in params])
        if "window" in st:
            G, gram, count, pos = st["window"], st["gram"], st["count"], st["next"]
        else:
            m = group["window"]
            G = torch.zeros(m, d, dtype=dt, device=p0.device)
            gram = torch.zeros(m, m, dtype=dt, device=p0.device)
            count, pos = 0, 0
        m = G.shape[0]
        G = G.clone()
        G[pos] = g
        row = gram_row(G[None], g[None])[0]
        gram = gram.clone()
        gram[pos, :] = row
        gram[:, pos] = row
        n = min(count + 1, m)
        L = woodbury_factor(gram[None], n, group["damping"])
        direction = inverse_matmat(G[None, :n], L, group["damping"], g[None, :, None])[0, :, 0]
        if group["momentum"]:
            buf = st.get("momentum_buffer", torch.zeros_like(direction))
            direction = heavy_ball([buf], [direction], group["momentum"])[0]
            new.put(st, "momentum_buffer", direction, check=False)  # checked as the direction below
        new.check.append(row)
        new.put(st, "window", G, check=False)  # its one new row is g, checked with the gradients
        new.put(st, "gram", gram, check=False)  # its one new row is `row`
        new.put(st, "count", n)
        new.put(st, "next", (pos + 1) % m)
        new.put(st, "step", st.get("step", 0) + 1)
        views = dict(zip(map(id, params), direction.split([p.numel() for p in params])))
        new.move(moving, [views[id(p)].view_as(p) for p in moving], lr=group["lr"],
                 weight_decay=group["weight_decay"])
        new.check.append(g)
