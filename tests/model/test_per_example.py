"""per_example_gradients: row i is the gradient of example i's own terms, on every case."""

import pytest
import torch

import curvkit as ck
from curvkit.errors import ModelError
from curvkit.model import per_example_gradients
from cases import CASES, assert_close, concat, make_batches, make_model, make_loss, params, ref_per_example


@pytest.mark.parametrize("case", params())
def test_rows_are_the_gradients_of_each_example_alone(case):
    model, loss_fn = case.build(), case.loss()
    batch = case.batches()[0]
    G = per_example_gradients(model, loss_fn, batch, output=case.output)
    ref = ref_per_example(model, case.terms, batch, output=case.output)
    assert G.shape == ref.shape == (len(batch[1]), sum(p.numel() for p in model.parameters()))
    assert_close(G, ref)
    assert_close(per_example_gradients(model, loss_fn, batch, output=case.output, max_batch=3), G)


@pytest.mark.parametrize("case", params([c for c in CASES if c.name in ("mlp-ce-mean", "token_mlp-ce-function-reshape",
                                                                       "tied_lm-ce-smoothing-sum", "dict-bce-pos-weight")]))
def test_reduction_factor_times_the_rows_sum_is_the_gradient(case):
    """``grad L = c * sum_n g_n`` with ``c`` the loss's reduction factor."""
    model, loss_fn = case.build(), case.loss()
    batch = case.batches()[0]
    G = per_example_gradients(model, loss_fn, batch, output=case.output)
    H = ck.hessian(model, loss_fn, batch, output=case.output)
    loss, grad = H.loss_and_gradient()
    c = loss / float(case.terms(*_out_and_targets(model, case, batch)).sum())
    assert_close(c * G.sum(0), grad)


def _out_and_targets(model, case, batch):
    from cases import Flat

    f = Flat(model, output=case.output)
    with torch.no_grad():
        return f(f.theta0, batch[0]), batch[1]


def test_one_batch_only_and_no_batchnorm_in_train_mode():
    model = make_model("convbn")
    batches = make_batches("convbn", "ce")
    with pytest.raises(ModelError, match="one \\(inputs, targets\\) batch"):
        per_example_gradients(model, make_loss("ce"), batches)
    with pytest.raises(ModelError, match="BatchNorm in train mode.*mode='eval'"):
        per_example_gradients(model, make_loss("ce"), concat(batches), mode="train")
