"""ck.ggn equals the explicit J^T H_loss J on every case, is symmetric PSD, and handles any loss
of the outputs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit as ck
from curvkit.errors import LossWarning
from cases import (
    BY_NAME, assert_buffers_equal, assert_close, buffers_copy, cached_ref, concat, make_batches, make_model, params,
    ref_ggn, training_flags,
)


@pytest.mark.parametrize("case", params())
def test_ggn_equals_dense(case):
    model = case.build()
    flags, bufs = training_flags(model), buffers_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LossWarning)
        G = ck.ggn(model, case.loss(), case.batches(), output=case.output)
    # a loss linear in the outputs (NLL after log_softmax) has a zero GGN, and says so
    assert any(issubclass(w.category, LossWarning) for w in caught) == case.linear
    dense = G.dense()
    ref = cached_ref("ggn", case.name)
    assert_close(dense, ref)
    assert (ref.abs().max() == 0) == case.linear
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)
    # symmetric and positive semi-definite (every case's loss is convex in the outputs)
    assert_close(dense, dense.T)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-10 * max(float(evals.max()), 1.0)


# losses outside the closed forms: the autograd fallback
OTHER_LOSSES = {
    "huber-lambda": (lambda out, y: F.smooth_l1_loss(out, y, beta=0.7), "mse"),
    "mse-lambda": (lambda out, y: F.mse_loss(out, y), "mse"),  # no forward-over-reverse in torch
    "huber-fn-sum": (lambda out, y: F.huber_loss(out, y, delta=0.5, reduction="sum"), "mse"),
    "ce-soft-targets": (lambda out, y: F.cross_entropy(out, F.one_hot(y, 3).to(out.dtype) * 0.8 + 0.2 / 3), "ce"),
    "gaussian-nll": (lambda out, y: F.gaussian_nll_loss(out, y, torch.full_like(y, 0.3)), "mse"),
}


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
def test_ggn_other_losses_equal_explicit(name):
    loss_fn, targets = OTHER_LOSSES[name]
    model = make_model("mlp")
    x, y = concat(make_batches("mlp", targets))
    if name == "huber-lambda":
        # some residuals on each side of the kink, so the fallback's output Hessian is not trivially 2I
        with torch.no_grad():
            r = (model(x) - y).abs()
        assert (r < 0.7).any() and (r > 0.7).any()
    G = ck.ggn(model, loss_fn, (x, y))
    assert_close(G.dense(), ref_ggn(model, loss_fn, [(x, y)]))


def test_ggn_ignore_index_differs_from_plain_ce():
    """The masking matters: the reference with ignored targets is not the plain CE GGN."""
    assert (cached_ref("ggn", "mlp-ce-ignore-index") - cached_ref("ggn", "mlp-ce-mean")).abs().max() > 1e-3
    assert (cached_ref("ggn", "mlp-ce-class-weights") - cached_ref("ggn", "mlp-ce-mean")).abs().max() > 1e-3
    assert BY_NAME["mlp-ce-ignore-index"].ignore_index == 1


# losses whose mean has the same normaliser in every example: several batches = the concatenated data
@pytest.mark.parametrize("name", ["huber-lambda", "mse-lambda", "huber-fn-sum"])
def test_ggn_other_losses_uneven_batches(name):
    loss_fn, targets = OTHER_LOSSES[name]
    model, batches = make_model("layernorm"), make_batches("layernorm", targets)
    reduction = "sum" if name.endswith("-sum") else None  # a plain function cannot say it sums
    G = ck.ggn(model, loss_fn, batches, reduction=reduction)
    assert_close(G.dense(), ref_ggn(model, loss_fn, batches))


def test_reduction_override_matters_for_summing_functions():
    loss_fn, _ = OTHER_LOSSES["huber-fn-sum"]
    model, batches = make_model("mlp"), make_batches("mlp", "mse")
    ref = ref_ggn(model, loss_fn, batches)
    assert_close(ck.ggn(model, loss_fn, batches, reduction="sum").dense(), ref)
    # taken as a mean, the batches are weighted N_b / N: not the summed loss's curvature
    assert (ck.ggn(model, loss_fn, batches).dense() - ref).abs().max() > 1e-3


def test_nll_after_log_softmax_warns_that_the_ggn_is_zero_and_how_to_split():
    """Regression: NLLLoss on an in-model log_softmax has a zero GGN; curvkit says so and how to
    move the curvature into the loss (the logits with CrossEntropyLoss)."""
    model, batches = make_model("logsoftmax"), make_batches("logsoftmax", "ce")
    with pytest.warns(LossWarning, match=r"linear in the model's outputs.*zero.*log_softmax.*CrossEntropyLoss"):
        G = ck.ggn(model, nn.NLLLoss(), batches)
    assert G.dense().abs().max() == 0
    # the split it recommends: the same loss, with the curvature where the GGN sees it
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossWarning)
        G_split = ck.ggn(model.net, nn.CrossEntropyLoss(), batches)
    assert_close(G_split.dense(), ref_ggn(model.net, nn.CrossEntropyLoss(), batches))
    assert G_split.dense().abs().max() > 1e-3
