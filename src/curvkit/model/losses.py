r"""Loss specs: what every curvature matrix needs to know of a loss, written once per loss.

Write a batch's loss as ``L = c * sum_t l_t(f)``: a sum over the loss's **terms** ``t`` (what a
``"mean"`` reduction divides by) times the reduction factor ``c`` (``1 / terms`` for ``"mean"``,
1 for ``"sum"``). A term is one row of the output along its **event** dimension: for
cross-entropy and NLL one position (the class dimension is the event; positions whose target is
``ignore_index`` are no term); for squared error and binary cross-entropy one row of the last
dimension (for an ``(N, D)`` output, one example), while their mean divides by every entry.

From that one definition:

- batches are weighted by their terms, so re-batching the same data never changes a result;
- the GGN's output-space matrix is ``c * d2 l / df2`` (:meth:`LossSpec.hessian_matmat`), with a
  square root for K-FAC (:meth:`LossSpec.sqrt`);
- the empirical Fisher is ``c * sum_t J^T r_t r_t^T J`` with ``r_t`` the gradient of term ``t``
  (:meth:`LossSpec.residuals`), the Monte-Carlo Fisher the same at targets drawn from the
  model's predictive distribution (:meth:`LossSpec.sample`); so ``E[F_mc] = GGN``.

The same loss spelled as ``nn.CrossEntropyLoss`` on ``(B, V, T)`` logits, as
``CrossEntropy(class_dim=-1)`` on ``(B, T, V)``, or as a plain function
``F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=-100)`` has the same terms and
gives the same matrices: :func:`loss_spec` recognises standard losses written as functions by
what they compute. A spec is itself a loss (``spec(outputs, targets)``), so it can be passed
wherever a loss is. A function curvkit cannot recognise is :class:`FunctionLoss`: autograd
curvature, its terms the examples unless declared (``FunctionLoss(fn, terms=...)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ..errors import LossError, LossWarning

LossFn = Callable[[Tensor, Tensor], Tensor]
REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise LossError(
            f"the loss has reduction={reduction!r}; curvature needs a scalar loss: use reduction='mean' or 'sum'"
        )
    return reduction


class LossSpec:
    """Output-space curvature of a scalar loss (see the module docstring for the notation).

    Subclasses give closed forms; every method takes the model's outputs ``out`` and the
    targets ``y`` of one batch.
    """

    name = "loss"
    has_likelihood = False  # whether targets can be sampled (Monte-Carlo Fisher, Sophia-G)
    linear = False  # the loss is linear in the outputs (its GGN is zero)

    def __init__(self, reduction: str = "mean"):
        self.reduction = _check_reduction(reduction)

    # the loss itself --------------------------------------------------------------------
    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def sum_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """``sum_t l_t``: the loss with reduction "sum" (a per-example gradient's loss)."""
        return self(out, y) / self.factor(out, y)

    # terms ------------------------------------------------------------------------------
    def terms(self, out: Tensor, y: Tensor) -> Tensor | int:
        """What a "mean" reduction divides this batch's sum by (a tensor where it depends on the
        targets: no host sync)."""
        raise NotImplementedError

    def factor(self, out: Tensor, y: Tensor) -> Tensor | float:
        """``c``: ``1 / terms`` for "mean", 1 for "sum"."""
        return 1.0 if self.reduction == "sum" else 1.0 / self.terms(out, y)

    def weight(self, out: Tensor, y: Tensor) -> Tensor | float:
        """A batch's weight in a loss over many batches: its terms ("mean") or 1 ("sum")."""
        return 1.0 if self.reduction == "sum" else self.terms(out, y)

    def event_dims(self, out: Tensor) -> tuple[int, ...]:
        """The dimensions of ``out`` that form one term's outcome."""
        return (out.dim() - 1,) if out.dim() >= 2 else ()

    # curvature --------------------------------------------------------------------------
    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        """``d2 L / d out2`` (the factor ``c`` included) times each of the ``k`` blocks
        ``U (k, *out.shape)``."""
        raise NotImplementedError

    def sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        r"""Columns ``S (m, *out.shape)`` with ``sum_j S_j S_j^T = d2 L / d out2`` restricted to
        each example (no cross-example terms): the type-2 K-FAC columns. ``m`` is the number of
        backward passes K-FAC spends. Default: the example's output Hessian from
        ``m = out[0].numel()`` products and an ``eigh`` (negative eigenvalues clamped at 0)."""
        b, rest = out.shape[0], out.shape[1:]
        D = out[0].numel()
        U = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *rest).expand(D, b, *rest)
        H = self.hessian_matmat(out, y, U.contiguous()).reshape(D, b, D).permute(1, 2, 0)  # H[n][:, j]
        dt = torch.float64 if out.dtype == torch.float64 else torch.float32
        Hs = H.to(dt)
        w, Q = torch.linalg.eigh(0.5 * (Hs + Hs.transpose(-1, -2)))
        S = (Q * w.clamp_min(0).sqrt()[:, None, :]).to(out.dtype)  # (b, D, D): S S^T = H_n
        return S.permute(2, 0, 1).reshape(D, b, *rest)

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        """``r``: the gradient of the batch loss divided by ``c`` (each term's gradient at its
        position), shape of ``out``."""
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            (r,) = torch.autograd.grad(self(o, y), o)
        return r / self.factor(out, y)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``out``."""
        raise LossError(
            f"sampling targets from the model's predictive distribution (the Monte-Carlo Fisher, K-FAC's "
            f"'mc' kind, Sophia-G) needs a likelihood, which curvkit does not know for {self.describe()}: it "
            "knows it for CrossEntropyLoss, NLLLoss, MSELoss and BCEWithLogitsLoss; use kind='empirical' "
            "or ck.ggn for this loss (Sophia: estimator='hutchinson')"
        )

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """Residuals at targets drawn from the model (``y``, the data's targets, only says which
        terms exist and their weights): ``E[r r^T]`` per term is the term's output Hessian."""
        return self.residuals(out, self.sample(out, gen))

    def residual_draws(self, out: Tensor, y: Tensor, kind: str, gen: torch.Generator | None = None,
                       samples: int = 1) -> Tensor:
        """``R (m, *out.shape)``: the residuals a Fisher is made of, ``kind="empirical"`` at the
        data's targets (``m = 1``), ``kind="mc"`` at ``samples`` draws from the model (``gen``)."""
        if kind == "empirical":
            return self.residuals(out, y)[None]
        return torch.stack([self.sampled_residuals(out, y, gen) for _ in range(samples)])

    def output_columns(self, out: Tensor, y: Tensor, kind: str, gen: torch.Generator | None = None,
                       samples: int = 1) -> Tensor:
        """``m`` columns ``u_j (m, *out.shape)`` of the output space whose outer products sum to
        the batch's output curvature of ``kind``, the factor ``c`` included: "type-2" the loss
        Hessian's square root (:meth:`sqrt`), "empirical" the residuals at the targets, "mc" the
        residuals at ``samples`` draws (``gen``), averaged. Their backward through the model gives
        the Kronecker factors' output gradients (K-FAC, EK-FAC). Free beyond the draws."""
        if kind == "type-2":
            return self.sqrt(out, y)
        R = self.residual_draws(out, y, kind, gen, samples)
        R = R / math.sqrt(R.shape[0])  # the m draws' outer products averaged
        c = torch.as_tensor(self.factor(out, y), dtype=out.dtype, device=out.device)
        return R * c.sqrt()

    def fisher_matmat(self, out: Tensor, R: Tensor, U: Tensor, factor: Tensor | float) -> Tensor:
        """``factor * mean_m sum_t r_mt (r_mt . U_t)``: the Fisher's output-space matrix for
        residual samples ``R (m, *out.shape)`` on blocks ``U (k, *out.shape)``."""
        dims = [d + 2 for d in self.event_dims(out)]
        RU = R[None] * U[:, None]
        s = RU.sum(dim=dims, keepdim=True) if dims else RU
        return (s * R[None]).sum(1) * (factor / R.shape[0])

    def describe(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    __repr__ = describe


# ---------------------------------------------------------------------------------------------
class CrossEntropy(LossSpec):
    r"""Softmax cross-entropy over ``class_dim`` with class-index or class-probability targets,
    as ``nn.CrossEntropyLoss`` (``weight``, ``ignore_index``, ``label_smoothing``).

    Per position, with ``p = softmax(f)`` and the (smoothed, weighted) target vector ``q``:
    ``l = -sum_c q_c log p_c``, gradient ``s p - q`` and Hessian ``s (diag(p) - p p^T)``,
    ``s = sum_c q_c`` (1 without class weights). A "mean" divides by the number of positions
    whose target is not ``ignore_index`` (their class weights' sum when weighted), or by all
    positions for probability targets. ``class_dim=-1`` takes ``(B, T, C)`` logits.
    """

    name, has_likelihood = "cross_entropy", True

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean", class_dim: int = 1):
        super().__init__(reduction)
        self.class_weight, self.ignore_index = weight, int(ignore_index)
        self.label_smoothing, self.class_dim = float(label_smoothing), int(class_dim)

    # layout: the class dimension moved to 1, as torch's functional API wants it
    def _cd(self, out: Tensor) -> int:
        return self.class_dim % out.dim() if out.dim() >= 2 else 0

    def _c1(self, t: Tensor, lead: int = 0) -> Tensor:
        """``t`` (with ``lead`` leading probe dims) with the class dimension at ``lead + 1``."""
        cd = self._cd(t) if not lead else self.class_dim % (t.dim() - lead)
        return t if cd in (0, 1) else t.movedim(cd + lead, 1 + lead)

    def _back(self, t: Tensor, like: Tensor, lead: int = 0) -> Tensor:
        cd = self._cd(like)
        return t if cd in (0, 1) else t.movedim(1 + lead, cd + lead)

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        w = None if self.class_weight is None else self.class_weight.to(out)
        return F.cross_entropy(self._c1(out), self._c1(y) if y.is_floating_point() else y, weight=w,
                               ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)

    def sum_loss(self, out: Tensor, y: Tensor) -> Tensor:
        w = None if self.class_weight is None else self.class_weight.to(out)
        return F.cross_entropy(self._c1(out), self._c1(y) if y.is_floating_point() else y, weight=w,
                               ignore_index=self.ignore_index, reduction="sum",
                               label_smoothing=self.label_smoothing)

    def event_dims(self, out: Tensor) -> tuple[int, ...]:
        return (self.class_dim % out.dim(),)

    def _targets(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, q)`` in the class-at-1 layout: ``s (b, 1, ...)`` and ``q (b, C, ...)``, zero at
        ignored positions."""
        o = self._c1(out)
        C, eps = o.shape[1], self.label_smoothing
        w = None if self.class_weight is None else self.class_weight.to(o)
        shape = [1, C] + [1] * (o.dim() - 2)
        if y.is_floating_point():  # class probabilities
            q = self._c1(y).to(o.dtype)
            q = (1 - eps) * q + eps / C if eps else q
        else:
            keep = (y != self.ignore_index).unsqueeze(1).to(o.dtype)
            q = F.one_hot(y.clamp(0, C - 1), C).movedim(-1, 1).to(o.dtype)
            q = keep * ((1 - eps) * q + eps / C) if eps else keep * q
        if w is not None:
            q = q * w.reshape(shape)
        return q.sum(1, keepdim=True), q

    def _scale(self, out: Tensor, y: Tensor) -> Tensor:
        """``s = sum_c q_c`` of :meth:`_targets`, ``(b, 1, ...)``, without the (b, C, ...) one-hot
        for class-index targets (a GPT-2 vocabulary makes that 0.8 GB per batch of 8 x 512)."""
        if y.is_floating_point():
            return self._targets(out, y)[0]
        o = self._c1(out)
        keep = (y != self.ignore_index).to(o.dtype)
        eps = self.label_smoothing
        if self.class_weight is None:
            s = keep
        else:
            w = self.class_weight.to(o)
            s = keep * ((1 - eps) * w[y.clamp(0, w.numel() - 1)] + eps * w.mean())
        return s.unsqueeze(1)

    def terms(self, out: Tensor, y: Tensor) -> Tensor | int:
        if y.is_floating_point():
            return out.numel() // out.shape[self.class_dim]
        keep = y != self.ignore_index
        dt = _count_dtype(out)
        if self.class_weight is None:
            return keep.sum().to(dt)
        w = self.class_weight.to(device=out.device, dtype=dt)
        return (w[y.clamp(0, w.numel() - 1)] * keep).sum()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        s = self._scale(out, y)
        p = self._c1(out).softmax(dim=1)
        Uc = self._c1(U, lead=1)
        return self._back((self.factor(out, y) * s) * p * (Uc - (p * Uc).sum(dim=2, keepdim=True)), out, lead=1)

    def sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        """``sqrt(c s p_k) (e_k - p)`` per class ``k`` and position: ``C * positions`` columns, since
        ``sum_k p_k (e_k - p)(e_k - p)^T = diag(p) - p p^T``."""
        o = self._c1(out)
        b, C, R = o.shape[0], o.shape[1], o[0, 0].numel()
        s = self._scale(out, y)
        p = o.softmax(dim=1).reshape(b, C, R)
        scale = (self.factor(out, y) * s).reshape(b, 1, R)
        eye_c = torch.eye(C, dtype=o.dtype, device=o.device)
        base = (eye_c[:, None, :, None] - p[None]) * (scale * p).sqrt().transpose(0, 1)[:, :, None, :]
        eye_r = torch.eye(R, dtype=o.dtype, device=o.device)
        cols = (base[:, None] * eye_r[None, :, None, None, :]).reshape(C * R, *o.shape)  # one position each
        return self._back(cols, out, lead=1)

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        s, q = self._targets(out, y)
        return self._back(s * self._c1(out).softmax(dim=1) - q, out)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        """Class indices drawn from ``softmax(out)`` by inverse CDF, from uniforms drawn on the
        generator's device (a CPU generator gives the same samples on every device)."""
        return _categorical(self._c1(out.detach()).softmax(dim=1), gen)

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """``sqrt(s) (p - onehot(sample))``: the likelihood is the softmax itself (no smoothing);
        the data's targets give each term's weight ``s`` (0 where ignored)."""
        o = self._c1(out)
        s, _ = self._targets(out, y)
        t = F.one_hot(self.sample(out, gen), o.shape[1]).movedim(-1, 1).to(o.dtype)
        return self._back(s.sqrt() * (o.softmax(dim=1) - t), out)

    def describe(self) -> str:
        extra = "".join([f", ignore_index={self.ignore_index}" if self.ignore_index != -100 else "",
                         ", weight=..." if self.class_weight is not None else "",
                         f", label_smoothing={self.label_smoothing}" if self.label_smoothing else "",
                         f", class_dim={self.class_dim}" if self.class_dim != 1 else ""])
        return f"CrossEntropy(reduction={self.reduction!r}{extra})"

    __repr__ = describe


class NLL(CrossEntropy):
    r"""Negative log-likelihood of log-probabilities (``nn.NLLLoss``): ``l = -w_y f_y``.

    Linear in the outputs, so its GGN is zero: the curvature lives in the model's own
    ``log_softmax``. The Fisher is fine (``E[e_y e_y^T] = diag(p)`` with ``p = exp(f)``); for the
    GGN, give the model's logits to :class:`CrossEntropy` instead.
    """

    name, linear = "nll", True

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 class_dim: int = 1):
        super().__init__(weight, ignore_index, 0.0, reduction, class_dim)

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        w = None if self.class_weight is None else self.class_weight.to(out)
        return F.nll_loss(self._c1(out), y, weight=w, ignore_index=self.ignore_index, reduction=self.reduction)

    def sum_loss(self, out: Tensor, y: Tensor) -> Tensor:
        w = None if self.class_weight is None else self.class_weight.to(out)
        return F.nll_loss(self._c1(out), y, weight=w, ignore_index=self.ignore_index, reduction="sum")

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        return torch.zeros_like(U)

    def sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        return torch.zeros_like(out)[None]

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        _, q = self._targets(out, y)
        return self._back(-q, out)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        return _categorical(self._c1(out.detach()).exp(), gen)

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        o = self._c1(out)
        s, _ = self._targets(out, y)
        t = F.one_hot(self.sample(out, gen), o.shape[1]).movedim(-1, 1).to(o.dtype)
        return self._back(-s.sqrt() * t, out)

    def describe(self) -> str:
        return super().describe().replace("CrossEntropy", "NLL", 1)

    __repr__ = describe


class MSE(LossSpec):
    """Squared error ``(f - y)^2`` (``nn.MSELoss``): ``H = 2 I`` per entry; a "mean" divides by
    every entry. The likelihood is a Gaussian of variance 1/2, so ``E[r r^T] = H``."""

    name, has_likelihood = "mse", True

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        # sum / numel rather than F.mse_loss(mean): the same number, and its backward has a working
        # forward-mode derivative (mse_loss's mean backward does not, pytorch#123996)
        s = F.mse_loss(out, y, reduction="sum")
        return s / out.numel() if self.reduction == "mean" else s

    def sum_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y, reduction="sum")

    def terms(self, out: Tensor, y: Tensor) -> int:
        return out.numel()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        return (2.0 * self.factor(out, y)) * U

    def sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        return _diagonal_sqrt(out, torch.full_like(out, 2.0 * self.factor(out, y)))

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        return 2.0 * (out - y)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        eps = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=gen.device).to(out.device)
        return out.detach() + eps * 0.5**0.5


class BCEWithLogits(LossSpec):
    """Sigmoid binary cross-entropy on logits (``nn.BCEWithLogitsLoss``, ``weight`` and
    ``pos_weight`` included): per entry ``H = w (pw y + 1 - y) s (1 - s)``, ``s = sigmoid(f)``; a
    "mean" divides by every entry."""

    name, has_likelihood = "bce_with_logits", True

    def __init__(self, weight: Tensor | None = None, pos_weight: Tensor | None = None, reduction: str = "mean"):
        super().__init__(reduction)
        self.entry_weight, self.pos_weight = weight, pos_weight

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), weight=self._w(out), reduction=self.reduction,
                                                  pos_weight=self._pw(out))

    def sum_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), weight=self._w(out), reduction="sum",
                                                  pos_weight=self._pw(out))

    def _w(self, out: Tensor) -> Tensor | None:
        return None if self.entry_weight is None else self.entry_weight.to(out)

    def _pw(self, out: Tensor) -> Tensor | None:
        return None if self.pos_weight is None else self.pos_weight.to(out)

    def _scale(self, out: Tensor, y: Tensor) -> Tensor | float:
        """``w (pw y + 1 - y)``: each entry's weight (1 without weights)."""
        scale: Tensor | float = 1.0
        if self.pos_weight is not None:
            yt = y.to(out.dtype)
            scale = self._pw(out) * yt + 1 - yt
        if self.entry_weight is not None:
            scale = scale * self._w(out)
        return scale

    def terms(self, out: Tensor, y: Tensor) -> int:
        return out.numel()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        s = out.sigmoid()
        return (self.factor(out, y) * self._scale(out, y) * s * (1 - s)) * U

    def sqrt(self, out: Tensor, y: Tensor) -> Tensor:
        s = out.sigmoid()
        return _diagonal_sqrt(out, self.factor(out, y) * self._scale(out, y) * s * (1 - s))

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        yt = y.to(out.dtype)
        s = out.sigmoid()
        if self.pos_weight is None:
            r = s - yt
        else:
            r = (self._pw(out) * yt + 1 - yt) * s - self._pw(out) * yt
        return r if self.entry_weight is None else r * self._w(out)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        s = out.detach().sigmoid()
        return (torch.rand(out.shape, generator=gen, dtype=out.dtype, device=gen.device).to(out.device) < s).to(out.dtype)

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        scale = self._scale(out, y)
        scale = scale.sqrt() if isinstance(scale, Tensor) else scale
        return scale * (out.sigmoid() - self.sample(out, gen))


def _categorical(p: Tensor, gen: torch.Generator) -> Tensor:
    """One class index per position from probabilities ``p (b, C, ...)`` (class dim 1), by
    inverse CDF in float64: ``prod(p.shape) / C`` uniforms from ``gen``, moved to ``p``'s device."""
    rows = p.movedim(1, -1).reshape(-1, p.shape[1]).to(torch.float64)
    cdf = rows.cumsum(-1)
    u = torch.rand(rows.shape[0], 1, generator=gen, dtype=torch.float64, device=gen.device).to(p.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_max(p.shape[1] - 1)
    return idx.reshape(p.shape[:1] + p.shape[2:])


def _count_dtype(out: Tensor) -> torch.dtype:
    """Counts and weights in float64 for float64 outputs, float32 otherwise (bf16 cannot count
    past 256)."""
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def _diagonal_sqrt(out: Tensor, h: Tensor) -> Tensor:
    """Square-root columns of a diagonal output Hessian ``h`` (shape of ``out``): one unit
    vector per output entry of an example, ``out[0].numel()`` columns."""
    D, rest = out[0].numel(), out.shape[1:]
    eye = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *rest)
    return eye * h.clamp_min(0).sqrt()[None]


class FunctionLoss(LossSpec):
    """Any twice-differentiable scalar loss ``fn(outputs, targets)``, curvature by autograd.

    ``terms(outputs, targets)`` says what a "mean" divides by; by default the examples
    (``targets.shape[0]``), which is right for a loss that averages over examples. A term is one
    example (the event is all of its outputs).
    """

    name = "function"

    def __init__(self, fn: LossFn, reduction: str = "mean", terms: Callable[[Tensor, Tensor], Any] | None = None):
        if not callable(fn):
            raise LossError(f"the loss must be callable as loss(outputs, targets), got {type(fn).__name__}")
        super().__init__(reduction)
        self.fn, self._terms = fn, terms

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        return self.fn(out, y)

    def terms(self, out: Tensor, y: Tensor) -> Tensor | int:
        if self._terms is not None:
            return self._terms(out, y)
        return int(y.shape[0]) if y.dim() else 1

    def event_dims(self, out: Tensor) -> tuple[int, ...]:
        return tuple(range(1, out.dim()))

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        g = grad(lambda o: self.fn(o, y))
        try:
            return vmap(lambda u: jvp(g, (out,), (u,))[1])(U)
        except RuntimeError:  # some losses are not vmap-able: same result, one probe at a time
            try:
                return torch.stack([jvp(g, (out,), (u,))[1] for u in U])
            except RuntimeError:  # no forward-mode derivative (e.g. huber_loss): double backward
                pass
            try:
                return self._double_backward(out, y, U)
            except RuntimeError as e:
                raise LossError(
                    f"cannot take the second derivative of the loss with respect to the model's "
                    f"outputs ({e}); the GGN needs a twice-differentiable loss of the outputs. Use "
                    "ck.hessian or ck.fisher(kind='empirical') instead"
                ) from e

    def _double_backward(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fn(o, y), o, create_graph=True)
            if not g.requires_grad:  # the loss is linear in the outputs: zero Hessian
                return torch.zeros_like(U)
            k = U.shape[0]
            return torch.stack([torch.autograd.grad(g, o, U[j], retain_graph=j < k - 1)[0] for j in range(k)])

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"FunctionLoss({name}, reduction={self.reduction!r})"

    __repr__ = describe


# ---------------------------------------------------------------------------------------------
def loss_spec(loss_fn: Any, out: Any = None, y: Tensor | None = None, reduction: str | None = None) -> LossSpec:
    """The spec of a loss however it is spelled: a :class:`LossSpec` as given; torch's
    ``CrossEntropyLoss``, ``NLLLoss``, ``MSELoss`` and ``BCEWithLogitsLoss`` modules as their
    closed forms; a plain function or other module recognised by its values on the first batch
    ``(out, y)`` as one of those (see :func:`recognise`), else :class:`FunctionLoss`.

    ``reduction`` overrides what a loss without a ``reduction`` attribute is taken to do
    ("mean" by default). Warns (:class:`~curvkit.errors.LossWarning`) when a loss's terms cannot
    be known and the targets suggest padding. Cost: at most two evaluations of the loss per
    candidate on the first batch's outputs (no model pass).
    """
    if isinstance(loss_fn, type):
        raise LossError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss; pass an instance: {loss_fn.__name__}()"
        )
    if isinstance(loss_fn, LossSpec):
        return loss_fn
    if not callable(loss_fn):
        raise LossError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    red = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    red = _check_reduction(reduction or red or "mean")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return CrossEntropy(loss_fn.weight, loss_fn.ignore_index, loss_fn.label_smoothing, red)
    if isinstance(loss_fn, nn.NLLLoss):
        return NLL(loss_fn.weight, loss_fn.ignore_index, red)
    if isinstance(loss_fn, nn.MSELoss) and (out is None or (isinstance(out, Tensor) and out.shape == y.shape)):
        return MSE(red)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (out is None or (isinstance(out, Tensor) and out.shape == y.shape)):
        return BCEWithLogits(loss_fn.weight, loss_fn.pos_weight, red)
    if isinstance(out, Tensor) and isinstance(y, Tensor):
        found = recognise(loss_fn, out, y)
        if found is not None:
            return found
        _warn_if_terms_unknown(loss_fn, out, y)
    return FunctionLoss(loss_fn, red)


def recognise(loss_fn: LossFn, out: Tensor, y: Tensor) -> LossSpec | None:
    """The standard spec that ``loss_fn`` computes, judged by its value at ``out`` and at a
    perturbed ``out`` (two evaluations per candidate), or None.

    Candidates: cross-entropy and NLL over dim 1 or the last dim (targets of the matching
    shape; ``ignore_index`` the one out-of-range target value if there is one, else -100),
    squared error and BCE-with-logits (targets shaped as the outputs), each with "mean" and
    "sum". This is what lets ``F.cross_entropy(out.reshape(-1, V), y.reshape(-1))`` weigh its
    batches by tokens, exactly as ``nn.CrossEntropyLoss`` does.
    """
    if not out.is_floating_point() or out.dim() == 0 or out.numel() == 0:
        return None
    cands: list[LossSpec] = []
    if not y.is_floating_point() and not y.is_complex():
        dims = []
        if out.dim() >= 2 and tuple(y.shape) == tuple(out.shape[:1] + out.shape[2:]):
            dims.append(1)
        if out.dim() >= 3 and tuple(y.shape) == tuple(out.shape[:-1]):
            dims.append(-1)
        for d in dims:
            C = out.shape[d]
            odd = torch.unique(y[(y < 0) | (y >= C)])
            if odd.numel() > 1:
                continue
            ignore = int(odd[0]) if odd.numel() else -100
            for red in REDUCTIONS:
                cands += [CrossEntropy(ignore_index=ignore, reduction=red, class_dim=d),
                          NLL(ignore_index=ignore, reduction=red, class_dim=d)]
    elif y.shape == out.shape and y.dtype == out.dtype:
        cands += [MSE(red) for red in REDUCTIONS]
        if bool(((y >= 0) & (y <= 1)).all()):
            cands += [BCEWithLogits(reduction=red) for red in REDUCTIONS]
    if not cands:
        return None
    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(1234)
        shifted = out + 0.5 * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        try:
            mine = [float(loss_fn(o, y)) for o in (out, shifted)]
        except Exception:  # noqa: BLE001 - a loss that fails on shifted outputs is simply not recognised
            return None
        tol = 1000 * torch.finfo(out.dtype).eps
        for c in cands:
            try:
                theirs = [float(c(o, y)) for o in (out, shifted)]
            except Exception:  # noqa: BLE001 - the candidate does not apply to these shapes
                continue
            if all(abs(a - b) <= tol * max(abs(a), abs(b), 1e-30) for a, b in zip(mine, theirs)):
                return c
    return None


def _warn_if_terms_unknown(loss_fn: Any, out: Tensor, y: Tensor) -> None:
    """Integer targets outside the class range (padding) or sequence outputs: a mean over
    tokens that curvkit would weigh by examples."""
    if y.is_floating_point() or y.dim() < 1:
        return
    padded = bool(((y < 0) | (y >= max(out.shape[-1], out.shape[1] if out.dim() > 1 else 1))).any())
    if padded or y.dim() >= 2:
        name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
        warnings.warn(
            f"curvkit cannot tell what the loss {name} averages over, so it weighs batches by their "
            "examples; if it averages over tokens (or skips padding), batches with different token "
            "counts are weighted wrongly. Pass curvkit.model.CrossEntropy(ignore_index=..., class_dim=-1) "
            "as the loss, or declare the terms: curvkit.model.FunctionLoss(fn, terms=lambda out, y: ...)",
            LossWarning,
            stacklevel=4,
        )


def warn_if_linear(spec: LossSpec, out: Tensor, y: Tensor, what: str) -> None:
    """A loss linear in the outputs (NLL after an in-model log_softmax) has a zero GGN: say so
    and how to split the model and the loss instead. Cost: one output-space product (generic)."""
    linear = spec.linear
    if not linear and isinstance(spec, FunctionLoss):
        gen = torch.Generator(device="cpu").manual_seed(0)
        U = torch.randn((1, *out.shape), generator=gen, dtype=out.dtype).to(out.device)
        linear = bool((spec.hessian_matmat(out.detach(), y, U) == 0).all())
    if linear:
        warnings.warn(
            f"the loss ({spec.describe()}) is linear in the model's outputs, so {what} is zero. If the "
            "model ends in log_softmax, drop that layer and use nn.CrossEntropyLoss on its logits "
            "(the same loss, with the curvature in the loss where the GGN can see it)",
            LossWarning,
            stacklevel=4,
        )


__all__ = [
    "LossSpec", "CrossEntropy", "NLL", "MSE", "BCEWithLogits", "FunctionLoss", "loss_spec", "recognise",
    "warn_if_linear",
]
