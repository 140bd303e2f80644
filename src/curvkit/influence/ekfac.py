r"""EK-FAC influence (George et al. 2018; Grosse et al. 2023): K-FAC's eigenbasis with the
eigenvalues refitted to the data.

Per Kronecker layer (Linear, transposed Conv1D, Conv2d with groups=1), with the K-FAC factors
``A = Q_A D_A Q_A^T`` and ``G = Q_G D_G Q_G^T`` (:func:`curvkit.kfac`, the same factors as the
K-FAC optimizer), the corrected eigenvalues are the curvature's own diagonal in that basis,

    Lambda_{ij} = mean over the data of  sum_{n, m} (Q_G^T M_{nm} Q_A)_{ij}^2

with ``M_{nm}`` the layer's matrix-form gradient of example ``n`` for output-space column ``m``
(type-2: a column of the square root of the loss's output Hessian, so the mean is the GGN's
diagonal in the basis; "empirical"/"mc": the per-example (sampled) loss gradient). Then
``(H + damping I)^{-1} M = Q_G [(Q_G^T M Q_A) / (Lambda + damping)] Q_A^T``.

Embedding and normalisation affine parameters (LayerNorm, RMSNorm, GroupNorm, BatchNorm), and
parameters tied between modules, get the same correction in the identity basis: a diagonal
``Lambda_k`` (for tied weights the gradient over every use, so tying is handled exactly on the
diagonal). Sequence models: every position is a row of ``A`` and of the columns' gradients, summed
per example (the EK-FAC paper's pooling over tokens); the scores are per example (sequence).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from ..approx import kfac
from ..approx.kfac import Kind
from ..approx.kronecker import input_rows, output_rows
from ..errors import ArgumentError, ModelError
from ..model.data import split_batch
from ..model.hooks import LayerHooks
from ..model.layers import layers as find_layers
from ..model.params import ParamSpec
from ..model.risk import Mode
from ..seeding import seed_int
from .base import Influence, Measurement, _unsqueeze

COVERED = ("linear (nn.Linear and modules computing x W^T + b or x W + b)", "conv2d (groups=1)",
           "embedding (diagonal)", "norm affine: LayerNorm/RMSNorm/GroupNorm/BatchNorm (diagonal)")


class EKFAC(Influence):
    r"""Influence scores with the EK-FAC approximation of the GGN (``kind="type-2"``, default) or
    of the Fisher (``"mc"``, ``"empirical"``) of the mean training loss.

    ``fit()``: K-FAC factors (one pass, ``ck.kfac``), two ``eigh`` per layer, and the eigenvalue
    correction from projected per-example gradients (one more pass). Exact (equal to
    :class:`~curvkit.influence.Exact` with the GGN) wherever K-FAC is: a single linear layer
    under squared error with one output per example, or one training example.

    ``.kfac``: the fitted :func:`curvkit.kfac` operator whose factors give the eigenbases (None
    without a Kronecker layer). ``.eigenvalues``: ``{layer: Lambda (out, cols)}`` and ``{parameter: Lambda (shape)}`` for the
    diagonal ones. A chosen parameter of any other layer type raises
    :class:`~curvkit.errors.ModelError` naming the covered kinds; leave it out with ``params=``.

    Cost of fit: two passes over the data (per batch one forward and ``m`` backward passes, ``m``
    as for ``ck.kfac``), plus per layer ``m * B * out * cols`` numbers for the projected gradients
    (processed ``chunk`` examples at a time). A preconditioning is four small matrix products
    per layer per gradient; scores then cost what :class:`Identity` does.

    Example:
        >>> import torch
        >>> from curvkit import influence
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 3).double()
        >>> x, y = torch.randn(20, 4).double(), torch.randint(0, 3, (20,))
        >>> inf = influence.EKFAC(model, torch.nn.CrossEntropyLoss(), (x, y), damping=1e-2).fit()
        >>> inf.scores((x[:2], y[:2])).shape          # (queries, training examples)
        torch.Size([2, 20])
        >>> bool((inf.self_influence() > 0).all())    # g^T (H + damping I)^{-1} g
        True
    """

    def __init__(self, model: nn.Module, loss_fn: Any, train_data: Any, params: ParamSpec = None, *,
                 damping: float = 1e-3, kind: Kind = "type-2", seed: int | torch.Generator | None = 0,
                 mc_samples: int = 1, measurement: Measurement | None = None, mode: Mode = "eval",
                 reduction: str | None = None, output: Any = None, max_batch: int | None = None,
                 distributed: bool | None = False, chunk: int = 64):
        super().__init__(model, loss_fn, train_data, params, damping=damping, measurement=measurement, mode=mode,
                         reduction=reduction, output=output, max_batch=max_batch, distributed=distributed)
        self.kind, self.seed, self.mc_samples, self.chunk = kind, seed, mc_samples, chunk
        self._kron, self._diag, left = [], [], []
        for layer in find_layers(self.model, self.risk.space.named):
            if layer.kron_reason() is None:
                self._kron.append(layer)
            elif layer.kind in ("embedding", "norm") or (layer.tied and layer.kind == "linear"):
                self._diag += layer.param_names
            else:
                left.append(f"{layer.name} ({type(layer.module).__name__}: {layer.kron_reason()})")
        if left:
            shown = "; ".join(left[:6]) + (f"; ... ({len(left)} in all)" if len(left) > 6 else "")
            raise ModelError(f"EK-FAC covers {', '.join(COVERED)}; not these layers: {shown}. Leave their "
                             "parameters out with params= (e.g. params=lambda n: not n.startswith('rnn')), or use "
                             "influence.CG / influence.Exact, which take any layer")

    def _fit(self) -> None:
        r = self.risk
        names = [n for layer in self._kron for n in layer.param_names]
        self._eig = {}
        if names:
            K = kfac(r.model, r.spec, r.batches, names, kind=self.kind, seed=self.seed, mc_samples=self.mc_samples,
                     **self._options())
            self._eig = {name: (QA, QG) for name, (_, QA, _, QG) in K.eigen().items()}
            self._seed = K.seed
        else:
            K, self._seed = None, seed_int(self.seed)
        self.kfac = K
        dt = self._work_dtype()
        zeros = [torch.zeros(layer.shape[0], self._eig[layer.name][0].shape[0], dtype=dt, device=r.space.device)
                 for layer in self._kron]
        shapes = dict(zip(r.space.names, r.space.shapes))
        zeros += [torch.zeros(shapes[n], dtype=dt, device=r.space.device) for n in self._diag]

        def batch(x: Any, y: Tensor, index: int):
            sums, loss, w = self._batch_correction(x, y, index)
            return [s * w for s in sums], loss, w

        totals = r.accumulate(batch, what="EK-FAC eigenvalue correction") if zeros else None
        s = totals.sums if totals is not None else []
        nk = len(self._kron)
        self.eigenvalues = {layer.name: totals.mean(s[j]) for j, layer in enumerate(self._kron)}
        self.eigenvalues.update({n: totals.mean(s[nk + j]) for j, n in enumerate(self._diag)})
        low = min(float(v.min()) for v in self.eigenvalues.values())
        if self.damping <= 0 and low <= 0:
            raise ArgumentError(f"the EK-FAC eigenvalues reach {low:.3e} (directions the data never moves), so "
                                "with damping=0 the inverse does not exist; pass damping > 0 (e.g. 1e-3 times "
                                "the mean eigenvalue)")

    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        """Output-space columns ``(m, *out.shape)`` whose outer products sum to the batch's
        output curvature (the factor ``c`` included), as ``ck.kfac`` uses them."""
        gen = None if self.kind != "mc" else self.risk.batch_generator(self._seed, index, out.device)
        return self.risk.spec.output_columns(out, y, self.kind, gen, self.mc_samples)

    def _batch_correction(self, x: Any, y: Tensor, index: int) -> tuple[list[Tensor], Tensor, Any]:
        r, dt = self.risk, self._work_dtype()
        f = r.function()
        params = {n: p.requires_grad_(True) for n, p in r.space.detached().items()}
        sums: list[Tensor] = []
        with torch.enable_grad():
            with LayerHooks(self._kron, grad_targets=True) as rec:
                out = f(params, x)
            cols = self._columns(out.detach(), y, index)
            if self._kron:
                targets = [rec.targets[layer.name] for layer in self._kron]
                grads = torch.autograd.grad(out, targets, cols, retain_graph=bool(self._diag), allow_unused=True,
                                            is_grads_batched=True)
        n = int(y.shape[0])
        for j, layer in enumerate(self._kron):
            QA, QG = self._eig[layer.name]
            a, T = input_rows(layer.module, rec.inputs[layer.name])
            a = a[:, layer.columns()].to(dt) @ QA.to(dt)                     # (n T, cols) in A's eigenbasis
            if grads[j] is None:
                sums.append(torch.zeros(QG.shape[0], QA.shape[0], dtype=dt, device=a.device))
                continue
            g = output_rows(layer.module, grads[j]).to(dt) @ QG.to(dt)      # (m, n T, out) in G's eigenbasis
            m = g.shape[0]
            a, g = a.reshape(n, T, -1), g.reshape(m, n, T, -1)
            acc = torch.zeros(g.shape[-1], a.shape[-1], dtype=dt, device=a.device)
            for i in range(0, n, self.chunk):  # per-example projected gradients, a chunk at a time
                M = torch.einsum("mbto,btc->mboc", g[:, i : i + self.chunk], a[i : i + self.chunk])
                acc += M.square().sum((0, 1))
            sums.append(acc)
        if self._diag:
            sums += self._diagonal(f, params, x, cols, dt)
        return sums, r.loss(out.detach(), y).detach(), r.weight(out.detach(), y)

    def _diagonal(self, f, params: dict[str, Tensor], x: Any, cols: Tensor, dt: torch.dtype) -> list[Tensor]:
        """``sum_{n,m} (J_n^T u_{nm})^2`` for the diagonal parameters: per example, one vjp per column."""
        diag = {k: params[k].detach() for k in self._diag}
        rest = {k: v.detach() for k, v in params.items() if k not in diag}

        def one(d: dict[str, Tensor], xi: Any, U: Tensor) -> dict[str, Tensor]:
            _, back = vjp(lambda p: f({**rest, **p}, _unsqueeze(xi)), d)
            return vmap(lambda u: back(u[None])[0])(U)

        acc = {k: torch.zeros(v.shape, dtype=dt, device=v.device) for k, v in diag.items()}
        n = int(cols.shape[1])
        U = cols.detach().movedim(0, 1)  # (n, m, ...)
        for i in range(0, n, self.chunk):
            xs, Us = split_batch(x, U, self.chunk)[i // self.chunk]
            got = vmap(one, in_dims=(None, 0, 0))(diag, xs, Us)
            for k in acc:
                acc[k] += got[k].to(dt).square().sum((0, 1))
        return [acc[k] for k in self._diag]

    def _precondition(self, Q: Tensor) -> Tensor:
        r, dt = self.risk, self._work_dtype()
        Q = Q.to(dt)
        k = Q.shape[0]
        parts = dict(zip(r.space.names, (t.reshape(k, *s) for t, s in zip(Q.split([math.prod(s) for s in r.space.shapes], 1), r.space.shapes))))
        out = {}
        for layer in self._kron:
            QA, QG = (t.to(dt) for t in self._eig[layer.name])
            names = layer.kron_params()
            M = layer.to_matrix([parts[n] for n in names])
            P = QG @ ((QG.T @ M @ QA) / (self.eigenvalues[layer.name] + self.damping)) @ QA.T
            out.update(zip(names, layer.from_matrix(P)))
        for n in self._diag:
            out[n] = parts[n] / (self.eigenvalues[n] + self.damping)
        return torch.cat([out[n].reshape(k, -1) for n in r.space.names], dim=1)


__all__ = ["EKFAC", "COVERED"]
