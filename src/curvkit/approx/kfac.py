r"""K-FAC: the curvature of a model's linear and convolution layers as a block-diagonal matrix of
Kronecker products ``A_l (x) G_l`` (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

The factors come from :mod:`curvkit.approx.kronecker`, the core the ``KFAC`` optimizer shares;
the layers, the hooks, the loss's output-Hessian square root and the data loop from
:mod:`curvkit.model`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ModelError
from ..linear_operator import BlockDiagonalOperator, LinearOperator
from ..model.hooks import LayerHooks
from ..model.losses import warn_if_linear
from ..model.params import ParamSpec
from ..model.risk import Mode
from ..operators.base import CurvatureOperator
from ..seeding import seed_int
from .kronecker import (activation_factor, gradient_factor, input_rows, kron_eigen, kron_layers, kron_matmul,
                        kron_solve, output_rows)
from .matfun import work_dtype

Kind = Literal["type-2", "mc", "empirical"]
KINDS = ("type-2", "mc", "empirical")
_HINT = "Use ck.ggn for this model, or leave that layer out with params="


class KFACOperator(CurvatureOperator):
    r"""Block-diagonal K-FAC approximation of the GGN (``kind="type-2"``), of the
    Monte-Carlo Fisher (``"mc"``) or of the empirical Fisher (``"empirical"``).

    One block ``A_l (x) G_l`` per supported layer (linear layers, by class or by what they
    compute, e.g. GPT-2's transposed ``Conv1D``; ``nn.Conv2d`` with ``groups=1``) over its chosen
    parameters ``[weight | bias]``; zero between layers. Factors follow the exact operators'
    conventions: curvature of the mean loss over all the data, ``A`` averaged over examples,
    ``G`` weighted by each batch's share of the loss's terms, the model in eval mode unless
    ``mode="train"``, summed over ranks under ``torch.distributed``. Type-2 uses the exact square
    root of the loss's output Hessian, so a block is exact whenever one example (and one conv
    position) is given, and for a last layer under squared error on any batch. Empirical and
    Monte-Carlo columns are the per-example residuals (one backward each).

    The scale convention, shared with the ``KFAC`` optimizer: ``A = 1/N sum_{n,t} a a^T`` over
    the ``N`` examples and ``T`` positions, and ``G = 1/T sum_{j,n,t} g_j g_j^T`` with ``g_j`` the
    layer-output gradient of output-space column ``j`` (type-2: a square root of ``c H``;
    empirical: ``sqrt(c) r``). For the empirical kind that is ``G = 1/(c T) sum_{n,t} (dL/ds)
    (dL/ds)^T`` with ``L`` the batch loss and ``c`` its reduction factor: the optimizer's formula,
    which takes ``c = 1/N``.

    ``.factors``: ``{layer: (A, G)}``; ``.inverse(damping)``: the operator
    ``(K + damping I)^{-1}``, exact per block via eigendecompositions of ``A`` and ``G``. Unlike the
    exact operators, the factors are a snapshot of the weights at construction (build a new
    ``ck.kfac`` after training steps); ``blocks()`` reuses them (no pass over the data for the
    factors, one forward on the first batch per block to check it).

    Cost to build: one pass over the data; per batch one forward and ``m`` backward passes
    batched into one vmapped backward (type-2: ``m`` = per-example output size, e.g. the number
    of classes times the positions; mc: ``mc_samples``; empirical: 1). A product with
    ``V (n, k)`` needs no data: ``2k`` small matrix products per layer. ``inverse`` costs two
    ``eigh`` per layer once.

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3).double(), torch.randn(8, 2).double()
        >>> K = ck.kfac(model, torch.nn.MSELoss(), (x, y))
        >>> G = ck.ggn(model, torch.nn.MSELoss(), (x, y))
        >>> bool((K.dense() - G.dense()).abs().max() < 1e-12)  # exact for one linear layer + MSE
        True
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *,
                 kind: Kind = "type-2", seed: int | torch.Generator | None = 0, mc_samples: int = 1,
                 factors: dict[str, tuple[Tensor, Tensor]] | None = None, mode: Mode = "eval",
                 reduction: str | None = None, output: Any = None, max_batch: int | None = None,
                 distributed: bool | None = None, fisher_type: Kind | None = None):
        if fisher_type is not None:
            warnings.warn("ck.kfac(fisher_type=...) is now kind=...", DeprecationWarning, stacklevel=3)
            kind = fisher_type
        if kind not in KINDS:
            raise ArgumentError(f"kind must be 'type-2' (the GGN), 'mc' or 'empirical', got {kind!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ArgumentError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.kind, self.seed, self.mc_samples = kind, seed_int(seed), mc_samples
        self._given = factors
        super().__init__(model, loss_fn, data, params, mode=mode, reduction=reduction, output=output,
                         max_batch=max_batch, distributed=distributed, cuda_graphs=False)

    @property
    def fisher_type(self) -> str:  # the old name
        return self.kind

    def _options(self) -> dict:
        opts = {**super()._options(), "kind": self.kind, "seed": self.seed, "mc_samples": self.mc_samples,
                "factors": self._factors}
        opts.pop("cuda_graphs")  # products need no data pass
        return opts

    def _setup(self) -> None:
        self._layers = self._build_layers()
        x, y = self.data.first()
        if self.kind == "type-2" or (self.kind == "mc" and not self.loss.has_likelihood):
            with self.risk.in_mode(), torch.no_grad():
                out = self.risk.function()(self.space.detached(), x)
            if self.kind == "mc":
                self.loss.sample(out, torch.Generator())  # raises the LossError that says why
            warn_if_linear(self.loss, out, y, "K-FAC's type-2 approximation (of the GGN)")
        given = self._given
        self._factors = given if given is not None else self._compute_factors()
        self._eig: dict[str, tuple] | None = None

    def _build_layers(self):
        layers, left = kron_layers(self.model, self.space.named)
        if left:
            why = "; ".join(f"{n}: {w}" for n, w in left[:6]) + (f"; ... ({len(left)} in all)" if len(left) > 6 else "")
            raise ModelError(
                f"K-FAC handles linear and Conv2d (groups=1) layers only, not these chosen "
                f"parameters: {why}. Leave them out with params= (e.g. params=lambda n: 'norm' not in n) "
                "or use ck.ggn / ck.fisher for the whole model"
            )
        return layers

    # factors ---------------------------------------------------------------------------
    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        """``m`` columns ``u_j`` of the batch loss's output space (``sum_j u_j u_j^T`` is the
        output-space curvature, factor ``c`` included); their backward gives ``g_j``."""
        gen = None if self.kind != "mc" else self.risk.batch_generator(self.seed, index, out.device)
        return self.loss.output_columns(out, y, self.kind, gen, self.mc_samples)

    def _batch_factors(self, x: Any, y: Tensor, index: int) -> tuple[list[Tensor], Tensor, Any]:
        params = {n: p.requires_grad_(True) for n, p in self.space.detached().items()}
        with torch.enable_grad():
            with LayerHooks(self._layers, grad_targets=True, hint=_HINT) as rec:
                out = self.risk.function()(params, x)
            cols = self._columns(out.detach(), y, index)
            used = [layer.name for layer in self._layers if layer.name in rec.targets]
            targets = [rec.targets[n] for n in used]
            try:
                grads = torch.autograd.grad(out, targets, cols, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward per column
                rows = [torch.autograd.grad(out, targets, c, retain_graph=True, allow_unused=True) for c in cols]
                grads = tuple(None if r[0] is None else torch.stack(list(r)) for r in zip(*rows))
        by_name = dict(zip(used, grads))
        n, w = y.shape[0], self.risk.weight(out.detach(), y)
        sums = []
        for layer in self._layers:
            A = G = None
            if layer.name in rec.inputs and by_name.get(layer.name) is not None:
                rows, T = input_rows(layer.module, rec.inputs[layer.name])
                A = activation_factor(rows, n) * n
                G = gradient_factor(output_rows(layer.module, by_name[layer.name]), T) * w
            sums += [A, G]
        return sums, self.risk.loss(out.detach(), y).detach(), w

    def _compute_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        dt = work_dtype(torch.empty(0, dtype=self.dtype))
        zeros = []
        for layer in self._layers:
            out, cols = layer.shape
            zeros += [torch.zeros(cols, cols, dtype=dt, device=self.device), torch.zeros(out, out, dtype=dt, device=self.device)]

        def batch(x: Any, y: Tensor, i: int):
            sums, loss, w = self._batch_factors(x, y, i)
            return [z if s is None else s.to(dt) for z, s in zip(zeros, sums)], loss, w

        totals = self.risk.accumulate(batch, what="K-FAC factor")
        s = totals.sums
        return {layer.name: (s[2 * j] / totals.examples, totals.mean(s[2 * j + 1]))
                for j, layer in enumerate(self._layers)}

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}`` over the chosen parameters' columns (``A`` is ``(in[+1], in[+1])``
        for a linear layer, ``(C*kh*kw[+1], ...)`` for a Conv2d; ``G`` is ``(out, out)``)."""
        return {layer.name: self._layer_factors(layer) for layer in self._layers}

    def _layer_factors(self, layer) -> tuple[Tensor, Tensor]:
        A, G = self._factors[layer.name]  # A over all of the layer's columns
        c = layer.columns()
        return A[c, c], G

    def eigen(self) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``{layer: (d_A, Q_A, d_G, Q_G)}`` (eigenvalues ascending), computed once and cached.
        Cost: two ``eigh`` per layer."""
        if self._eig is None:
            self._eig = {layer.name: kron_eigen(*self._layer_factors(layer)) for layer in self._layers}
        return self._eig

    # products --------------------------------------------------------------------------
    def _apply(self, V: Tensor, block_fn) -> Tensor:
        """Each layer's block applied to its part of ``V``; the result in the factors' dtype
        (float32 for a bf16/fp16 model, as the exact operators' products are)."""
        k, dt = V.shape[1], work_dtype(torch.empty(0, dtype=self.dtype))
        parts = dict(zip(self.param_names, (t.movedim(-1, 0) for t in self.split(V))))
        out = {}
        for layer in self._layers:
            names = layer.kron_params()
            R = block_fn(layer, layer.to_matrix([parts[n] for n in names]))
            out.update(zip(names, layer.from_matrix(R.to(dt))))
        return torch.cat([out[n].reshape(k, -1) for n in self.param_names], dim=1).T

    def _matmat(self, V: Tensor) -> Tensor:
        def block(layer, M):
            A, G = self._layer_factors(layer)
            return kron_matmul(M.to(A.dtype), A, G)
        return self._apply(V, block)

    def inverse(self, damping: float) -> LinearOperator:
        """``(K + damping I)^{-1}``, exact per block (``(A (x) G + damping I)^{-1}`` from the
        eigendecompositions of ``A`` and ``G``, not the factored ``(A + sqrt(d) I) (x) (G + sqrt(d) I)``).
        Cost: :meth:`eigen` once, then four small matrix products per layer per probe."""
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not 0 < damping < math.inf:
            raise ArgumentError(f"damping must be a finite number > 0, got {damping!r}")
        return KFACInverse(self, float(damping))


class KFACInverse(LinearOperator):
    """``(K + damping I)^{-1}`` of a :class:`KFACOperator`, one exact block solve per layer."""

    def __init__(self, K: KFACOperator, damping: float):
        self.K, self.damping = K, damping
        self.shape, self.dtype, self.device = K.shape, K.dtype, K.device

    def _matmat(self, V: Tensor) -> Tensor:
        eig = self.K.eigen()
        return self.K._apply(V, lambda layer, M: kron_solve(M, eig[layer.name], self.damping))


def kfac(model: nn.Module, loss_fn: Any, data: Any, params: ParamSpec = None, *, kind: Kind = "type-2",
         seed: int | torch.Generator | None = 0, mc_samples: int = 1, mode: Mode = "eval",
         reduction: str | None = None, output: Any = None, max_batch: int | None = None,
         distributed: bool | None = None, fisher_type: Kind | None = None) -> KFACOperator:
    """The K-FAC approximation of the GGN / Fisher of ``loss_fn(model(inputs), targets)`` over ``data``.

    ``kind``: "type-2" (exact output-Hessian square root: approximates the GGN), "mc"
    (``mc_samples`` targets per example sampled from the model, seeded by ``seed``) or
    "empirical" (the data's targets); ``fisher_type`` is its old name. Cost: one pass over the
    data (see :class:`KFACOperator`).
    """
    return KFACOperator(model, loss_fn, data, params, kind=kind, seed=seed, mc_samples=mc_samples, mode=mode,
                        reduction=reduction, output=output, max_batch=max_batch, distributed=distributed,
                        fisher_type=fisher_type)


__all__ = ["kfac", "KFACOperator", "KFACInverse"]
