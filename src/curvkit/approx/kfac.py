r"""K-FAC: the curvature of a model's ``nn.Linear``/``nn.Conv2d`` layers as a block-diagonal matrix
of Kronecker products ``A_l (x) G_l`` (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

The factors come from :mod:`curvkit.approx.kronecker`, the core the ``KFAC`` optimizer shares.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ArgumentError, ModelError
from ..operators._losses import (BCEWithLogitsSpec, CrossEntropySpec, LossSpec, MSESpec, loss_spec,
                                 loss_terms)
from ..operators.base import CurvatureOperator, LinearOperator
from .kronecker import (KronLayer, Recorder, activation_factor, gradient_factor, input_rows, kron_eigen,
                        kron_layers, kron_matmul, kron_solve, output_rows)
from .matfun import sym_eigh, work_dtype

FisherType = Literal["type-2", "mc", "empirical"]
_HINT = "Use ck.ggn for this model, or leave that layer out with params="


def output_sqrt(spec: LossSpec, out: Tensor, y: Tensor) -> Tensor:
    r"""Columns ``S`` with ``sum_j S_j S_j^T = c H_n`` for every example ``n``: shape
    ``(m, *out.shape)``, the j-th column of example n's square root in ``[j, n]``.

    Closed forms: squared error / BCE (diagonal ``H``): ``sqrt(c h)`` times unit vectors;
    cross-entropy per position: ``sqrt(c p_k) (e_k - p)``, since
    ``sum_k p_k (e_k - p)(e_k - p)^T = diag(p) - p p^T``. Any other loss: its per-example output
    Hessian from ``m = out[0].numel()`` Hessian products and an ``eigh`` (negative eigenvalues
    clamped at 0). ``m`` is the per-example output size, i.e. the number of backward passes.
    """
    b, rest = out.shape[0], out.shape[1:]
    D = out[0].numel()
    if isinstance(spec, (MSESpec, BCEWithLogitsSpec)):
        h = spec.hessian_matmat(out, y, torch.ones_like(out)[None])[0]
        eye = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *rest)
        return eye * h.clamp_min(0).sqrt()[None]
    if isinstance(spec, CrossEntropySpec):
        C, R = out.shape[1], D // out.shape[1]
        p = out.softmax(dim=1).reshape(b, C, R)
        scale = (spec.factor(out, y) * spec._mask(out, y)).reshape(b, 1, R)
        eye_c = torch.eye(C, dtype=out.dtype, device=out.device)
        base = (eye_c[:, None, :, None] - p[None]) * (scale * p).sqrt().transpose(0, 1)[:, :, None, :]
        eye_r = torch.eye(R, dtype=out.dtype, device=out.device)
        cols = base[:, None] * eye_r[None, :, None, None, :]  # (C, R, b, C, R): one position each
        return cols.reshape(C * R, b, *rest)
    U = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *rest).expand(D, b, *rest)
    H = spec.hessian_matmat(out, y, U.contiguous()).reshape(D, b, D).permute(1, 2, 0)  # H[n][:, j]
    w, Q = sym_eigh(H)
    S = (Q * w.clamp_min(0).sqrt()[:, None, :]).to(out.dtype)  # (b, D, D): S S^T = H_n
    return S.permute(2, 0, 1).reshape(D, b, *rest)


class KFACOperator(CurvatureOperator):
    r"""Block-diagonal K-FAC approximation of the GGN (``fisher_type="type-2"``), of the
    Monte-Carlo Fisher (``"mc"``) or of the empirical Fisher (``"empirical"``).

    One block ``A_l (x) G_l`` per supported layer (``nn.Linear``, ``nn.Conv2d`` with
    ``groups=1``) over its chosen parameters ``[weight | bias]``; zero between layers. Factors
    follow the exact operators' conventions: curvature of the mean loss over all the data, ``A``
    averaged over examples, ``G`` weighted by each batch's share of the loss's terms, the model
    in eval mode unless ``mode="train"``. Type-2 uses the exact square root of the loss's
    output Hessian, so a block is exact whenever one example (and one conv position) is given,
    and for a last layer under squared error on any batch.

    ``.factors``: ``{layer: (A, G)}``; ``.inverse(damping)``: the operator
    ``(K + damping I)^{-1}``, exact per block via eigendecompositions of ``A`` and ``G``.

    Cost to build: one pass over the data; per batch one forward and ``m`` backward passes
    batched into one vmapped backward (type-2: ``m`` = per-example output size, e.g. the number
    of classes; mc: ``mc_samples``; empirical: 1). A product with ``V (n, k)`` needs no data:
    ``2k`` small matrix products per layer. ``inverse`` costs two ``eigh`` per layer once.

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> K = ck.kfac(model.double(), torch.nn.MSELoss(), (x.double(), y.double()))
        >>> G = ck.ggn(model, torch.nn.MSELoss(), (x.double(), y.double()))
        >>> bool((K.dense() - G.dense()).abs().max() < 1e-12)  # exact for one linear layer + MSE
        True
    """

    def __init__(self, model, loss_fn, data, params=None, *, fisher_type: FisherType = "type-2",
                 seed: int = 0, mc_samples: int = 1, **kw: Any):
        if fisher_type not in ("type-2", "mc", "empirical"):
            raise ArgumentError(f"fisher_type must be 'type-2' (the GGN), 'mc' or 'empirical', got {fisher_type!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ArgumentError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ArgumentError(f"seed must be an int, got {seed!r}")
        kw["cuda_graphs"] = False  # products need no data pass
        super().__init__(model, loss_fn, data, params, **kw)
        if fisher_type == "mc" and not self.loss.has_likelihood:
            self.loss.sample(torch.zeros(1), torch.Generator())  # raises the LossError that says why
        self.fisher_type, self.seed, self.mc_samples = fisher_type, seed, mc_samples
        self._layers = self._build_layers(self._named)
        self._factors = self._compute_factors()
        self._eig: dict[str, tuple] | None = None

    def _setup(self, out: Any, y: Tensor) -> None:
        self.loss = loss_spec(self.loss_fn, self.reduction, out, y)

    def _build_layers(self, named) -> list[KronLayer]:
        layers, left = kron_layers(self.model, named)
        if left:
            why = "; ".join(f"{n}: {w}" for n, w in left[:6]) + (f"; ... ({len(left)} in all)" if len(left) > 6 else "")
            raise ModelError(
                f"K-FAC handles nn.Linear and nn.Conv2d (groups=1) layers only, not these chosen "
                f"parameters: {why}. Leave them out with params= (e.g. params=lambda n: 'norm' not in n) "
                "or use ck.ggn / ck.fisher for the whole model"
            )
        return layers

    # factors ---------------------------------------------------------------------------
    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        spec = self.loss
        if self.fisher_type == "type-2":
            return output_sqrt(spec, out, y)
        if self.fisher_type == "empirical":
            R = spec.residuals(out, y)[None]
        else:
            gen = torch.Generator(device=out.device)
            gen.manual_seed((self.seed * 1_000_003 + index) % 2**64)
            R = torch.stack([spec.sampled_residuals(out, y, gen) for _ in range(self.mc_samples)])
            R = R / math.sqrt(self.mc_samples)
        c = torch.as_tensor(spec.factor(out, y), dtype=out.dtype, device=out.device)
        return R * c.sqrt()

    def _batch_factors(self, x: Any, y: Tensor, index: int) -> tuple[list, Tensor]:
        params = {n: p.detach().requires_grad_(True) for n, p in self._named}
        with torch.enable_grad():
            with Recorder(self._layers, _HINT) as rec:
                out = self._model_fn()(params, x)
            cols = self._columns(out.detach(), y, index)
            keys = [id(layer.module) for layer in self._layers]
            used = [k for k in keys if k in rec.outputs]
            outs = [rec.outputs[k] for k in used]
            try:
                grads = torch.autograd.grad(out, outs, cols, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward per column
                rows = [torch.autograd.grad(out, outs, c, retain_graph=True, allow_unused=True) for c in cols]
                grads = tuple(None if r[0] is None else torch.stack(list(r)) for r in zip(*rows))
        by_key = dict(zip(used, grads))
        n, result = y.shape[0], []
        for layer, k in zip(self._layers, keys):
            a_rows, T = input_rows(layer.module, rec.inputs[k]) if k in rec.inputs else (None, 1)
            g = by_key.get(k)
            if a_rows is None or g is None:  # the layer does not influence the outputs of this batch
                result.append(None)
                continue
            result.append((activation_factor(a_rows, n), gradient_factor(output_rows(layer.module, g), T)))
        return result, self.loss_fn(out.detach(), y).detach().reshape(())

    def _compute_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        dt = work_dtype(torch.empty(0, dtype=self.dtype))
        sums = [[torch.zeros(s, s, dtype=dt, device=self.device) for s in (layer.shape[1], layer.shape[0])]
                for layer in self._layers]
        losses, total, mean = [], 0.0, self.reduction == "mean"
        with self._in_mode():
            for i, x, y in self.data:
                facs, loss = self._batch_factors(x, y, i)
                w = loss_terms(self.loss_fn, y) if mean else 1.0
                for (A, G), f in zip(sums, facs):
                    if f is not None:
                        A.add_(f[0] * y.shape[0])
                        G.add_(f[1] * w)
                total = total + w
                losses.append(loss)
        flat = torch.cat([t.reshape(-1) for pair in sums for t in pair])
        self._check_finite(torch.stack(losses), flat[None])
        return {layer.name: (A / self.num_data, G / total if mean else G)
                for layer, (A, G) in zip(self._layers, sums)}

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}`` over the chosen parameters' columns (``A`` is ``(in[+1], in[+1])``
        for a Linear layer, ``(C*kh*kw[+1], ...)`` for a Conv2d; ``G`` is ``(out, out)``)."""
        return {layer.name: self._layer_factors(layer) for layer in self._layers}

    def _layer_factors(self, layer: KronLayer) -> tuple[Tensor, Tensor]:
        A, G = self._factors[layer.name]
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
        k = V.shape[1]
        parts = dict(zip(self.param_names, (t.movedim(-1, 0) for t in self.split(V))))
        out = {}
        for layer in self._layers:
            R = block_fn(layer, layer.to_matrix([parts[n] for n in layer.params]))
            out.update(zip(layer.params, layer.from_matrix(R.to(V.dtype))))
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

    def blocks(self, by: Literal["layer", "param"] = "layer") -> dict[str, KFACOperator]:
        """Diagonal blocks (per layer or per parameter) sharing this operator's factors (free)."""
        out = super().blocks(by)
        for block in out.values():
            block._layers, block._eig = block._build_layers(block._named), None
        return out


class KFACInverse(LinearOperator):
    """``(K + damping I)^{-1}`` of a :class:`KFACOperator`, one exact block solve per layer."""

    def __init__(self, K: KFACOperator, damping: float):
        self.K, self.damping = K, damping
        self.shape, self.dtype, self.device = K.shape, K.dtype, K.device

    def _matmat(self, V: Tensor) -> Tensor:
        eig = self.K.eigen()
        return self.K._apply(V, lambda layer, M: kron_solve(M, eig[layer.name], self.damping))


def kfac(model, loss_fn, data, params=None, fisher_type: FisherType = "type-2", seed: int = 0,
         mc_samples: int = 1, **kw: Any) -> KFACOperator:
    """The K-FAC approximation of the GGN / Fisher of ``loss_fn(model(inputs), targets)`` over ``data``.

    ``fisher_type``: "type-2" (exact output-Hessian square root: approximates the GGN), "mc"
    (``mc_samples`` targets per example sampled from the model, seeded by ``seed``) or
    "empirical" (the data's targets). Cost: one pass over the data (see :class:`KFACOperator`).
    """
    return KFACOperator(model, loss_fn, data, params, fisher_type=fisher_type, seed=seed,
                        mc_samples=mc_samples, **kw)


__all__ = ["kfac", "KFACOperator", "KFACInverse", "output_sqrt"]
