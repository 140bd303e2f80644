"""ck.ggn equals the explicit J^T H_loss J, is symmetric PSD, and handles any loss of the outputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit as ck

from .reference import (
    GRID, assert_buffers_equal, assert_close, buffers_copy, cached_ref, case, concat, make_batches, make_model,
    ref_ggn, ref_hessian, training_flags,
)


@pytest.mark.parametrize("kind, loss, reduction, one_batch", GRID)
def test_ggn_equals_dense(kind, loss, reduction, one_batch):
    model, loss_fn, data = case(kind, loss, reduction, one_batch)
    flags, bufs = training_flags(model), buffers_copy(model)
    G = ck.ggn(model, loss_fn, data[0] if one_batch else data)
    dense = G.dense()
    ref = cached_ref("ggn", kind, loss, reduction)
    assert_close(dense, ref)
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)
    # symmetric and positive semi-definite (all three losses are convex in the outputs)
    assert_close(dense, dense.T)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-10 * evals.max()


# losses outside the closed forms: the autograd fallback (and CE's ignore_index masking)
OTHER_LOSSES = {
    "huber-lambda": (lambda out, y: F.smooth_l1_loss(out, y, beta=0.7), "mse"),
    "mse-lambda": (lambda out, y: F.mse_loss(out, y), "mse"),  # no forward-over-reverse in torch
    "huber-fn-sum": (lambda out, y: F.huber_loss(out, y, delta=0.5, reduction="sum"), "mse"),
    "ce-weight": (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)), "ce"),
    "ce-label-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "ce"),
    "ce-ignore-index": (nn.CrossEntropyLoss(ignore_index=1), "ce"),
    "ce-ignore-index-sum": (nn.CrossEntropyLoss(ignore_index=1, reduction="sum"), "ce"),
    "ce-soft-targets": (lambda out, y: F.cross_entropy(out, F.one_hot(y, 3).to(out.dtype) * 0.8 + 0.2 / 3), "ce"),
    "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)), "bce"),
    "gaussian-nll": (lambda out, y: F.gaussian_nll_loss(out, y, torch.full_like(y, 0.3)), "mse"),
}


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
def test_ggn_other_losses_equal_explicit(name):
    loss_fn, targets = OTHER_LOSSES[name]
    model = make_model("mlp")
    (x, y), = [concat(make_batches("mlp", targets))]
    if name.startswith("ce-ignore"):
        assert 0 < int((y == 1).sum()) < len(y)  # some targets ignored, not all
    if name == "huber-lambda":
        # some residuals on each side of the kink, so the fallback's output Hessian is not trivially 2I
        r = (model(x) - y).abs()
        assert ((r < 0.7).any() and (r > 0.7).any())
    G = ck.ggn(model, loss_fn, (x, y))
    assert_close(G.dense(), ref_ggn(model, loss_fn, [(x, y)]))


def test_ggn_ignore_index_differs_from_plain_ce():
    """The masking matters: the reference with ignored targets is not the plain CE GGN."""
    model = make_model("mlp")
    x, y = concat(make_batches("mlp", "ce"))
    G_ignore = ck.ggn(model, nn.CrossEntropyLoss(ignore_index=1), (x, y)).dense()
    G_plain = ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense()
    assert (G_ignore - G_plain).abs().max() > 1e-3


def test_ggn_weight_sharing_is_not_blockwise_sum_of_uses():
    """Sanity check of the shared model: both uses of the Linear contribute to one block."""
    model = make_model("shared")
    batches = make_batches("shared", "mse")
    G = ck.ggn(model, nn.MSELoss(), batches)
    assert G.shape[0] == sum(p.numel() for p in model.parameters())
    assert_close(G.dense(), ref_ggn(model, nn.MSELoss(), batches))


# losses whose mean has the same normaliser in every example: several batches = the concatenated data
@pytest.mark.parametrize("name", ["huber-lambda", "mse-lambda", "huber-fn-sum", "ce-label-smoothing", "bce-pos-weight"])
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


@pytest.mark.parametrize("name", ["ce-ignore-index", "ce-weight"])
def test_ce_batch_dependent_normaliser_uneven_batches(name):
    """CE with ignore_index / class weights divides each batch by its own term count; weighting
    batches by that count gives the curvature of the mean loss over the concatenated data."""
    loss_fn, _ = OTHER_LOSSES[name]
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    assert_close(ck.ggn(model, loss_fn, batches).dense(), ref_ggn(model, loss_fn, batches))
    assert_close(ck.hessian(model, loss_fn, batches).dense(), ref_hessian(model, loss_fn, batches))
