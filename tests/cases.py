"""One shared set of test cases, and dense references computed from the definitions.

A :class:`Case` is a tiny float64 model (a few dozen parameters), a loss as a user would spell it,
and uneven batches (7 + 5 + 3 examples). ``CASES`` spans the architectures and losses curvkit must
get right: an MLP, a CNN with BatchNorm in eval mode, a module used twice, a tied embedding and
head, in-place activations, LayerNorm, per-pixel outputs, sequence models with (B, T, V) outputs
(a per-token MLP and a causal self-attention written with plain matmuls and softmax), dict inputs
passed as keyword arguments with a dict output picked by ``output=``; cross-entropy with
``ignore_index`` (uneven token counts per batch), label smoothing and class weights, squared
error, BCE-with-logits with and without ``pos_weight``, NLL, each with "mean" and "sum".

The references follow the definitions, never curvkit's code:

- Hessian: ``torch.autograd.functional.hessian`` of the loss on the concatenated data as a
  function of the flat parameter vector (``torch.func.functional_call``);
- GGN: ``J^T H_out J`` with ``J`` the Jacobian of the flat outputs and ``H_out`` the Hessian of
  the loss with respect to them;
- empirical Fisher: ``c * sum_t g_t g_t^T`` over the loss's terms ``t`` (one row along the event
  dimension: a position's class vector for CE/NLL, a row of the last dimension for MSE/BCE),
  with ``g_t`` the gradient of term t's loss (torch's ``reduction="none"``, rows summed) and
  ``c`` the reduction factor, defined by ``loss = c * sum_t l_t`` on the concatenated data;
- per-example gradients: the gradient of each example's own terms, one example at a time.

Import it as ``from cases import ...`` (``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian as ag_hessian
from torch.autograd.functional import jacobian as ag_jacobian
from torch.func import functional_call

from curvkit.model import CrossEntropy

DT = torch.float64  # every exactness test runs in float64 (set explicitly, not as a global default)
TOL = 1e-10
UNEVEN = (7, 5, 3)
D_IN, D_OUT = 4, 3  # vector models: (N, 4) -> (N, 3)
T, D_TOK, V = 3, 3, 4  # sequence models: (B, T, D_TOK) -> (B, T, V); T != V so no dimension is ambiguous
V_LM = 5  # the tied language model's vocabulary
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, 6), nn.Linear(6, D_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> tanh -> Linear on 1 x 4 x 4 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 2 * 2, D_OUT)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class Shared(nn.Module):
    """The same Linear applied twice: weight sharing inside one forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class LNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(D_IN, 5), nn.LayerNorm(5), nn.Linear(5, D_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def inplace_relu() -> nn.Module:
    """``Linear -> ReLU(inplace=True) -> Linear``: the ReLU overwrites the first layer's output."""
    return nn.Sequential(nn.Linear(D_IN, 6), nn.ReLU(inplace=True), nn.Linear(6, D_OUT))


class LogSoftmaxMLP(nn.Module):
    """An MLP ending in log_softmax, for NLLLoss: the loss is linear in these outputs."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, x):
        return self.net(x).log_softmax(-1)


class Seg(nn.Module):
    """Per-pixel logits (N, 3, 2, 2) from 1 x 3 x 3 images: cross-entropy over dim 1."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 2), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


class TokenMLP(nn.Module):
    """(B, T, D_TOK) -> (B, T, V), the same MLP at every position."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_TOK, 5), nn.Linear(5, V)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CausalAttention(nn.Module):
    """One causal self-attention head with plain matmuls and softmax: (B, T, D_TOK) -> (B, T, V)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D_TOK, D_TOK, bias=False) for _ in range(3))
        self.out = nn.Linear(D_TOK, V)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        n = x.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D_TOK)
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.out(torch.tanh(attn @ v))


class TiedLM(nn.Module):
    """Token ids (B, T) -> logits (B, V_LM, T); the head's weight is the embedding's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V_LM, D_TOK)
        self.mid = nn.Linear(D_TOK, D_TOK)
        self.head = nn.Linear(D_TOK, V_LM)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens)))).transpose(1, 2)


class DictNet(nn.Module):
    """Called as ``model(**inputs)`` with inputs ``{"x": (N, 4), "scale": (N, 1)}``; returns a dict."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, 5), nn.Linear(5, D_OUT)

    def forward(self, x, scale):
        return {"logits": self.fc2(torch.tanh(self.fc1(x)) * scale), "hidden": x}


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm affine parameters and running statistics (eval != train for BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase)):
                for p in m.parameters(recurse=False):
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g, dtype=DT))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=DT))
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP, "convbn": ConvBN, "shared": Shared, "layernorm": LNNet, "inplace_relu": inplace_relu,
    "logsoftmax": LogSoftmaxMLP, "seg": Seg, "token_mlp": TokenMLP, "attention": CausalAttention,
    "tied_lm": TiedLM, "dict": DictNet,
}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh float64 model, the same for the same seed (left in train mode, as nn.Module starts)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MODELS[kind]().double()
    return _perturb(model, seed + 100)


# ---------------------------------------------------------------------------------------------
# data
INPUTS = {"mlp": "vec", "convbn": "img", "shared": "vec", "layernorm": "vec", "inplace_relu": "vec",
          "logsoftmax": "vec", "seg": "img3", "token_mlp": "seq", "attention": "seq", "tied_lm": "tokens",
          "dict": "dict"}


def make_inputs(kind: str, n: int, g: torch.Generator) -> Any:
    """Inputs of ``n`` examples for the model ``kind``."""
    what = INPUTS[kind]
    if what == "vec":
        return torch.randn(n, D_IN, generator=g, dtype=DT)
    if what == "img":
        return torch.randn(n, 1, 4, 4, generator=g, dtype=DT)
    if what == "img3":
        return torch.randn(n, 1, 3, 3, generator=g, dtype=DT)
    if what == "seq":
        return torch.randn(n, T, D_TOK, generator=g, dtype=DT)
    if what == "tokens":
        return torch.randint(0, V_LM, (n, T), generator=g)
    return {"x": torch.randn(n, D_IN, generator=g, dtype=DT), "scale": 0.5 + torch.rand(n, 1, generator=g, dtype=DT)}


def make_targets(loss: str, n: int, g: torch.Generator) -> Tensor:
    """Targets of ``n`` examples: "ce" classes, "mse" real rows, "bce" 0/1 rows, "pixels" per-pixel
    classes, "tokens"/"lm" per-position classes with about a third of them ``IGNORE`` (padding)."""
    if loss == "ce":
        return torch.randint(0, D_OUT, (n,), generator=g)
    if loss == "mse":
        return torch.randn(n, D_OUT, generator=g, dtype=DT)
    if loss == "bce":
        return torch.rand(n, D_OUT, generator=g, dtype=DT).round()
    if loss == "pixels":
        return torch.randint(0, D_OUT, (n, 2, 2), generator=g)
    if loss in ("tokens", "lm"):
        y = torch.randint(0, V if loss == "tokens" else V_LM, (n, T), generator=g)
        pad = torch.rand(n, T, generator=g) < 0.35
        return y.masked_fill(pad, IGNORE)
    raise ValueError(loss)


def make_batches(kind: str, loss: str, sizes: Sequence[int] = UNEVEN, seed: int = 1) -> list[tuple[Any, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(make_inputs(kind, n, g), make_targets(loss, n, g)) for n in sizes]


def concat(batches) -> tuple[Any, Tensor]:
    """All the batches as one (dict inputs concatenated key by key)."""
    xs, ys = [x for x, _ in batches], [y for _, y in batches]
    if isinstance(xs[0], Mapping):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)
    return torch.cat(xs), torch.cat(ys)


def take(x: Any, idx: slice) -> Any:
    """Examples ``idx`` of inputs (a tensor or a dict of tensors)."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, Mapping) else x[idx]


# ---------------------------------------------------------------------------------------------
# the losses' terms, from torch's own reduction="none" (a row of the event dimension each)
def ce_terms(weight=None, ignore_index=IGNORE, label_smoothing=0.0, class_dim=1):
    def terms(out: Tensor, y: Tensor) -> Tensor:
        o = out.movedim(class_dim, 1) if class_dim != 1 else out
        return F.cross_entropy(o, y, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction="none").reshape(-1)
    return terms


def nll_terms(weight=None):
    def terms(out: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(out, y, weight=weight, reduction="none").reshape(-1)
    return terms


def mse_terms(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y, reduction="none").sum(-1).reshape(-1)


def bce_terms(weight=None, pos_weight=None):
    def terms(out: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, y, weight=weight, pos_weight=pos_weight,
                                                  reduction="none").sum(-1).reshape(-1)
    return terms


CLASS_W = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
POS_W = torch.tensor([0.5, 2.0, 1.5], dtype=DT)
ENTRY_W = torch.tensor([1.0, 0.3, 2.0], dtype=DT)


def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    return {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss](reduction=reduction)


BASIC_TERMS = {"ce": ce_terms(), "mse": mse_terms, "bce": bce_terms()}


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Case:
    """A model, a loss and uneven batches, with what the tests need to know about them.

    ``loss()`` is the loss as the user passes it; ``ref_loss()`` the same loss in plain torch for
    the references (it differs only where ``loss`` is a curvkit spec); ``terms(out, y)`` the loss's
    per-term values with ``loss = c * terms.sum()``. ``kfac``: "exact" (one datum gives the GGN's
    layer blocks, over ``kfac_params``), "refused" (weight sharing or tying: ModelError), or None.
    The Monte-Carlo Fisher's expectation is the GGN of ``mc_target(model)``'s ``(module, loss)``
    (default: this case's own GGN). ``linear``: the loss is linear in the outputs (a zero GGN,
    with a LossWarning). ``seq``: inputs and targets have a position dimension after the batch.
    """

    name: str
    model_kind: str
    target_kind: str
    loss: Callable[[], Any]
    terms: Callable[[Tensor, Tensor], Tensor]
    reduction: str = "mean"
    ref_loss_fn: Callable[[], Any] | None = None
    output: Any = None
    kfac: str | None = "exact"
    kfac_params: Any = None
    mc_target: Callable[[nn.Module], tuple[nn.Module, Any]] | None = None
    linear: bool = False
    ignore_index: int | None = None
    seq: bool = False

    def __str__(self) -> str:
        return self.name

    def build(self) -> nn.Module:
        return make_model(self.model_kind)

    def ref_loss(self) -> Any:
        return (self.ref_loss_fn or self.loss)()

    def batches(self, sizes: Sequence[int] = UNEVEN) -> list[tuple[Any, Tensor]]:
        return make_batches(self.model_kind, self.target_kind, sizes)

    def one_batch(self) -> list[tuple[Any, Tensor]]:
        return [concat(self.batches())]

    def datum(self) -> list[tuple[Any, Tensor]]:
        """One example (and, for sequences, one position) whose target is not ignored."""
        x, y = concat(self.batches())
        first = y.reshape(len(y), -1)[:, 0]
        i = int((first != self.ignore_index).nonzero()[0, 0]) if self.ignore_index is not None else 0
        x, y = take(x, slice(i, i + 1)), y[i : i + 1]
        if self.seq:  # inputs and targets (B, T, ...)
            x, y = x[:, :1], y[:, :1]
        return [(x, y)]


def _basic() -> list[Case]:
    kfac = {"mlp": ("exact", None), "convbn": ("exact", "^fc"), "shared": ("refused", None),
            "layernorm": ("exact", lambda n: not n.startswith("ln."))}
    out = []
    for red in ("mean", "sum"):
        for kind in ("mlp", "convbn", "shared", "layernorm"):
            for loss in ("ce", "mse", "bce"):
                how, params = kfac[kind]
                out.append(Case(f"{kind}-{loss}-{red}", kind, loss, functools.partial(make_loss, loss, red),
                                BASIC_TERMS[loss], red, kfac=how, kfac_params=params))
    return out


def _special() -> list[Case]:
    ce_fn_reshape = lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE)  # noqa: E731
    ce_fn_sum = lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="sum")  # noqa: E731
    ce_t = lambda out, y: F.cross_entropy(out.transpose(1, 2), y, ignore_index=IGNORE)  # noqa: E731
    return [
        Case("mlp-ce-ignore-index", "mlp", "ce", lambda: nn.CrossEntropyLoss(ignore_index=1),
             ce_terms(ignore_index=1), ignore_index=1),
        Case("mlp-ce-label-smoothing", "mlp", "ce", lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
             ce_terms(label_smoothing=0.2)),
        Case("mlp-ce-class-weights", "mlp", "ce", lambda: nn.CrossEntropyLoss(weight=CLASS_W),
             ce_terms(weight=CLASS_W)),
        Case("mlp-ce-weights-smoothing-ignore", "mlp", "ce",
             lambda: nn.CrossEntropyLoss(weight=CLASS_W, ignore_index=1, label_smoothing=0.1),
             ce_terms(weight=CLASS_W, ignore_index=1, label_smoothing=0.1), ignore_index=1),
        Case("mlp-bce-pos-weight", "mlp", "bce", lambda: nn.BCEWithLogitsLoss(pos_weight=POS_W),
             bce_terms(pos_weight=POS_W)),
        Case("mlp-bce-weight-pos-weight-sum", "mlp", "bce",
             lambda: nn.BCEWithLogitsLoss(weight=ENTRY_W, pos_weight=POS_W, reduction="sum"),
             bce_terms(weight=ENTRY_W, pos_weight=POS_W), "sum"),
        Case("logsoftmax-nll-mean", "logsoftmax", "ce", nn.NLLLoss, nll_terms(), kfac=None, linear=True,
             mc_target=lambda m: (m.net, nn.CrossEntropyLoss())),
        Case("logsoftmax-nll-weights-sum", "logsoftmax", "ce", lambda: nn.NLLLoss(weight=CLASS_W, reduction="sum"),
             nll_terms(weight=CLASS_W), "sum", kfac=None, linear=True,
             mc_target=lambda m: (m.net, nn.CrossEntropyLoss(weight=CLASS_W, reduction="sum"))),
        Case("inplace_relu-mse-mean", "inplace_relu", "mse", nn.MSELoss, mse_terms),
        Case("inplace_relu-ce-sum", "inplace_relu", "ce", lambda: nn.CrossEntropyLoss(reduction="sum"),
             ce_terms(), "sum"),
        # one term per pixel; K-FAC is not exact with several conv positions
        Case("seg-ce-mean", "seg", "pixels", nn.CrossEntropyLoss, ce_terms(), kfac=None),
        Case("seg-ce-sum", "seg", "pixels", lambda: nn.CrossEntropyLoss(reduction="sum"), ce_terms(), "sum", kfac=None),
        # sequences: one term per position that is not ignored, uneven token counts per batch
        Case("token_mlp-ce-function-reshape", "token_mlp", "tokens", lambda: ce_fn_reshape, ce_terms(class_dim=-1),
             ignore_index=IGNORE, seq=True),
        Case("attention-ce-spec-class-dim", "attention", "tokens", lambda: CrossEntropy(ignore_index=IGNORE, class_dim=-1),
             ce_terms(class_dim=-1), ref_loss_fn=lambda: ce_t, ignore_index=IGNORE, seq=True),
        Case("attention-ce-function-sum", "attention", "tokens", lambda: ce_fn_sum, ce_terms(class_dim=-1), "sum",
             ignore_index=IGNORE, seq=True),
        Case("tied_lm-ce-mean", "tied_lm", "lm", nn.CrossEntropyLoss, ce_terms(), kfac="refused",
             ignore_index=IGNORE, seq=True),
        Case("tied_lm-ce-smoothing-sum", "tied_lm", "lm", lambda: nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"),
             ce_terms(label_smoothing=0.1), "sum", kfac="refused", ignore_index=IGNORE, seq=True),
        Case("dict-bce-pos-weight", "dict", "bce", lambda: nn.BCEWithLogitsLoss(pos_weight=POS_W),
             bce_terms(pos_weight=POS_W), output="logits"),
        Case("dict-mse-sum", "dict", "mse", lambda: nn.MSELoss(reduction="sum"), mse_terms, "sum",
             output=lambda out: out["logits"]),
    ]


CASES: list[Case] = _basic() + _special()
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def params(cases: Sequence[Case] = CASES):
    """``pytest.mark.parametrize("case", params(...))`` with the cases' names as ids."""
    return [pytest.param(c, id=c.name) for c in cases]


# ---------------------------------------------------------------------------------------------
# dense references
def chosen_names(model: nn.Module, names=None) -> list[str]:
    return [n for n, p in model.named_parameters() if (names is None and p.requires_grad) or (names and n in names)]


def pick(out: Any, output: Any) -> Any:
    if output is None:
        return out
    return output(out) if callable(output) else out[output]


class Flat:
    """The model as a function of a flat vector over the parameters ``names`` (eval mode unless
    ``train``; dict inputs as keyword arguments; the output picked by ``output``)."""

    def __init__(self, model: nn.Module, names=None, train: bool = False, output: Any = None):
        self.model, self.train, self.output = model, train, output
        self.names = chosen_names(model, names)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names]).clone()
        self.others = {n: p.detach() for n, p in named.items() if n not in self.names}

    def unflat(self, theta):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            out[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def __call__(self, theta, x):
        was = {m: m.training for m in self.model.modules()}
        self.model.train(self.train)
        try:
            # cloned buffers: a train-mode BatchNorm must not touch the model's running stats
            buffers = {n: b.clone() for n, b in self.model.named_buffers()}
            args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
            out = functional_call(self.model, (self.unflat(theta), self.others, buffers), args, kwargs)
            return pick(out, self.output)
        finally:
            for m, t in was.items():
                m.training = t


def _hessian(fn, x):
    # reverse-over-reverse, vmapped over the rows: the same matrix as the default loop, faster
    return ag_hessian(fn, x, vectorize=True)


def ref_hessian(model, loss_fn, batches, names=None, train=False, per_batch_weights=None, output=None):
    """Hessian of the loss on the concatenated data (or of ``sum_b w_b loss_b`` if weights given)."""
    f = Flat(model, names, train, output)
    if per_batch_weights is None:
        X, Y = concat(batches)
        L = lambda th: loss_fn(f(th, X), Y)  # noqa: E731
    else:
        L = lambda th: sum(w * loss_fn(f(th, x), y) for w, (x, y) in zip(per_batch_weights, batches))  # noqa: E731
    return _hessian(L, f.theta0)


def ref_ggn(model, loss_fn, batches, names=None, output=None, train=False):
    """Explicit ``J^T H_out J`` on the concatenated data."""
    f = Flat(model, names, train, output)
    X, Y = concat(batches)
    out0 = f(f.theta0, X).detach()
    J = ag_jacobian(lambda th: f(th, X).reshape(-1), f.theta0, vectorize=True)  # (outputs, n)
    H_out = _hessian(lambda o: loss_fn(o.reshape(out0.shape), Y), out0.reshape(-1))  # (outputs, outputs)
    return J.T @ H_out @ J


def ref_empirical_fisher(model, loss_fn, terms, batches, names=None, output=None):
    """``c * sum_t g_t g_t^T``: ``g_t`` the gradient of term t's loss, ``c`` from ``loss = c * sum_t l_t``."""
    f = Flat(model, names, output=output)
    X, Y = concat(batches)
    with torch.no_grad():
        out = f(f.theta0, X)
        c = float(loss_fn(out, Y) / terms(out, Y).sum())
    G = ag_jacobian(lambda th: terms(f(th, X), Y), f.theta0, vectorize=True)  # (terms, n): g_t as rows
    return c * G.T @ G


def ref_per_example(model, terms, batch, names=None, output=None):
    """``(B, n)``: row i the gradient of example i's own terms, computed on that example alone."""
    f = Flat(model, names, output=output)
    x, y = batch
    rows = []
    for i in range(len(y)):
        th = f.theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(terms(f(th, take(x, slice(i, i + 1))), y[i : i + 1]).sum(), th)
        rows.append(g)
    return torch.stack(rows)


@functools.lru_cache(maxsize=None)
def cached_ref(which: str, name: str) -> Tensor:
    """A case's dense reference on its 15 examples (independent of how they are batched)."""
    case = BY_NAME[name]
    model, loss_fn, batches = case.build(), case.ref_loss(), case.batches()
    if which == "hessian":
        return ref_hessian(model, loss_fn, batches, output=case.output)
    if which == "ggn":
        return ref_ggn(model, loss_fn, batches, output=case.output)
    if which == "fisher":
        return ref_empirical_fisher(model, loss_fn, case.terms, batches, output=case.output)
    if which == "mc":  # what the Monte-Carlo Fisher's expectation is
        if case.mc_target is None:
            return cached_ref("ggn", name)
        sub, sub_loss = case.mc_target(model)
        return ref_ggn(sub, sub_loss, batches)
    raise ValueError(which)


# ---------------------------------------------------------------------------------------------
# assertions and small helpers
def assert_close(A: Tensor, B: Tensor, tol: float = TOL):
    assert A.shape == B.shape, (A.shape, B.shape)
    err = float((A - B).abs().max())
    assert err < tol, f"max abs difference {err:.3e} >= {tol:.0e} (scale {float(B.abs().max()):.3e})"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def training_flags(model):
    return [m.training for m in model.modules()]


def buffers_copy(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_buffers_equal(model, before):
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed"


def layer_slices(model: nn.Module, names: Sequence[str]) -> dict[str, slice]:
    """Flat index ranges of the chosen parameters grouped by the module that holds them (by name)."""
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    out: dict[str, list[int]] = {}
    i = 0
    for n in names:
        out.setdefault(n.rpartition(".")[0], []).extend(range(i, i + sizes[n]))
        i += sizes[n]
    return {k: slice(v[0], v[-1] + 1) for k, v in out.items()}
