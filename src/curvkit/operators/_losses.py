"""What the GGN and the Fisher need to know of a loss, with respect to the model's outputs.

Write a batch's loss as ``c * sum_n l_n(f_n)`` with ``l_n`` the per-example negative
log-likelihood and ``c`` the reduction factor (1 for "sum", 1/number-of-terms for "mean").
Then the batch's GGN is ``J^T (c * d2l/df2) J`` and its Fisher ``J^T (c * sum_n r_n r_n^T) J``
with ``r_n = dl_n/df_n`` at the data's targets (empirical) or at targets sampled from the
model's predictive distribution (Monte-Carlo). For the three standard losses these are closed
forms; any other scalar loss gets its output Hessian by autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ..errors import LossError

LossFn = Callable[[Tensor, Tensor], Tensor]


class LossSpec:
    """Output-space curvature of a scalar loss by autograd (works for any twice-differentiable loss)."""

    name = "generic"
    has_likelihood = False  # MC Fisher needs a sampler

    def __init__(self, loss_fn: LossFn, reduction: str):
        self.loss_fn, self.reduction = loss_fn, reduction

    def factor(self, out: Tensor, y: Tensor) -> Tensor | float:
        """``c``: the batch loss is ``c * sum`` of its per-example terms (mean: one term per example)."""
        return 1.0 if self.reduction == "sum" else 1.0 / out.shape[0]

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        """``d2 loss_fn(out, y) / d out^2`` times each of the k blocks ``U (k, *out.shape)``."""
        g = grad(lambda o: self.loss_fn(o, y))
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
            (g,) = torch.autograd.grad(self.loss_fn(o, y), o, create_graph=True)
            if not g.requires_grad:  # the loss is linear in the outputs: zero Hessian
                return torch.zeros_like(U)
            k = U.shape[0]
            return torch.stack([torch.autograd.grad(g, o, U[j], retain_graph=j < k - 1)[0] for j in range(k)])

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        """``r = dl_n/df_n`` per example, shape of ``out``: the gradient of the batch loss / c."""
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            (r,) = torch.autograd.grad(self.loss_fn(o, y), o)
        return r / self.factor(out, y)

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """``r_n`` at targets drawn from the model's predictive distribution (data targets ``y``)."""
        return self.residuals(out, self.sample(out, gen))

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        raise LossError(
            "the Monte-Carlo Fisher samples targets from the model's predictive distribution, which "
            "curvkit knows only for CrossEntropyLoss, MSELoss and BCEWithLogitsLoss; use "
            "kind='empirical' or ck.ggn for this loss"
        )


class CrossEntropySpec(LossSpec):
    """Softmax cross-entropy over dim 1 with class-index targets: ``H = diag(p) - p p^T``.

    Positions whose target is ``ignore_index`` contribute nothing and are not counted by the
    mean, exactly as in ``nn.CrossEntropyLoss``; label smoothing leaves H unchanged.
    """

    name, has_likelihood = "cross_entropy", True

    def _mask(self, out: Tensor, y: Tensor) -> Tensor:
        return (y != self.loss_fn.ignore_index).unsqueeze(1).to(out.dtype)  # (b, 1, ...)

    def factor(self, out: Tensor, y: Tensor) -> Tensor | float:
        return 1.0 if self.reduction == "sum" else 1.0 / self._mask(out, y).sum()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        p = out.softmax(dim=1)
        scale = self.factor(out, y) * self._mask(out, y)
        return scale * p * (U - (p * U).sum(dim=2, keepdim=True))

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        C, eps = out.shape[1], float(self.loss_fn.label_smoothing)
        mask = self._mask(out, y)
        target = F.one_hot(y.clamp(0, C - 1), C).movedim(-1, 1).to(out.dtype)
        return mask * (out.softmax(dim=1) - ((1 - eps) * target + eps / C))

    def sampled_residuals(self, out: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """``p - onehot(sample)``: the likelihood is the softmax itself, so no label smoothing, and
        positions the data ignores (``ignore_index`` in ``y``) stay out as in the GGN."""
        C, t = out.shape[1], self.sample(out, gen)
        return self._mask(out, y) * (out.softmax(dim=1) - F.one_hot(t, C).movedim(-1, 1).to(out.dtype))

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        p = out.detach().softmax(dim=1).movedim(1, -1).reshape(-1, out.shape[1])
        idx = torch.multinomial(p.to(torch.float64), 1, generator=gen).reshape(-1)
        return idx.reshape(out.shape[:1] + out.shape[2:])


class MSESpec(LossSpec):
    """Squared error: ``H = 2 I``; the likelihood is Gaussian with variance 1/2 so E[r r^T] = H."""

    name, has_likelihood = "mse", True

    def factor(self, out: Tensor, y: Tensor) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / out.numel()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        return (2.0 * self.factor(out, y)) * U

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        return 2.0 * (out - y)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        eps = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=gen.device).to(out.device)
        return out.detach() + eps * 0.5**0.5


class BCEWithLogitsSpec(LossSpec):
    """Sigmoid binary cross-entropy on logits: ``H = diag(s (1 - s))``, s = sigmoid(out)."""

    name, has_likelihood = "bce_with_logits", True

    def factor(self, out: Tensor, y: Tensor) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / out.numel()

    def hessian_matmat(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        s = out.sigmoid()
        return self.factor(out, y) * (s * (1 - s)) * U

    def residuals(self, out: Tensor, y: Tensor) -> Tensor:
        return out.sigmoid() - y.to(out.dtype)

    def sample(self, out: Tensor, gen: torch.Generator) -> Tensor:
        s = out.detach().sigmoid()
        return (torch.rand(out.shape, generator=gen, dtype=out.dtype, device=gen.device).to(out.device) < s).to(out.dtype)


def forward_ad_safe(loss_fn: LossFn) -> LossFn:
    """An equal loss that torch.func can differentiate forward-over-reverse.

    ``mse_loss``'s mean-reduction backward has no working forward-mode derivative ("ZeroTensors
    are immutable", pytorch#123996), which would push every MSE Hessian product onto the slow
    double-backward path; sum / numel is the same number without that bug.
    """
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean":
        return lambda out, y: F.mse_loss(out, y, reduction="sum") / out.numel()
    return loss_fn


def loss_terms(loss_fn: LossFn, y: Tensor) -> Tensor | int:
    """What a "mean" loss divides its batch sum by, so batches can be weighted exactly.

    ``CrossEntropyLoss``/``NLLLoss`` with class indices divide by the number of targets that are
    not ``ignore_index`` (their class weights' sum when weighted); every other loss is taken to
    average over examples. Returned as a tensor where it depends on the data (no host sync).
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and not y.is_floating_point():
        keep = y != loss_fn.ignore_index
        if loss_fn.weight is None:
            return keep.sum()
        return (loss_fn.weight[y.clamp(min=0, max=loss_fn.weight.numel() - 1)] * keep).sum()
    return y.shape[0]


def loss_spec(loss_fn: LossFn, reduction: str, out: Tensor, y: Tensor) -> LossSpec:
    """The closed form for a standard loss used plainly, else the autograd fallback."""
    if not isinstance(out, Tensor):
        raise LossError(
            f"the model returned {type(out).__name__}; the GGN and Fisher need a single output "
            "tensor. Wrap the model so it returns one tensor (e.g. the logits)"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is None and not y.is_floating_point() and out.dim() >= 2:
            return CrossEntropySpec(loss_fn, reduction)
    elif isinstance(loss_fn, nn.MSELoss) and out.shape == y.shape:
        return MSESpec(loss_fn, reduction)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss) and out.shape == y.shape:
        if loss_fn.weight is None and loss_fn.pos_weight is None:
            return BCEWithLogitsSpec(loss_fn, reduction)
    return LossSpec(loss_fn, reduction)
