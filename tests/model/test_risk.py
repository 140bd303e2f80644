"""The one data loop: batch weights are the loss's terms, output= picks what the loss sees, and
max_batch cuts batches without changing a result."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import LossError, ModelError
from curvkit.model import Risk
from cases import BY_NAME, CASES, IGNORE, Flat, assert_close, cached_ref, concat, params, randn


@pytest.mark.parametrize("case", params([BY_NAME[n] for n in ("mlp-ce-ignore-index", "mlp-ce-class-weights",
                                                             "token_mlp-ce-function-reshape", "mlp-mse-mean",
                                                             "tied_lm-ce-smoothing-sum")]))
def test_one_pass_weighs_batches_by_their_terms(case):
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    risk = Risk(model, loss_fn, batches, output=case.output)
    seen = []

    def fn(x, y, i):
        out = risk.function()(risk.space.detached(), x)
        w = risk.weight(out, y)
        seen.append((i, float(w)))
        return [torch.ones(1, dtype=torch.float64) * w], risk.loss(out, y), w

    totals = risk.accumulate(fn)
    X, Y = concat(batches)
    with torch.no_grad():
        out = Flat(model, output=case.output)(Flat(model).theta0, X)
        L = float(case.ref_loss()(out, Y))
    assert totals.examples == 15 and [i for i, _ in seen] == [0, 1, 2]
    assert totals.loss == pytest.approx(L, rel=1e-12)  # the loss of the concatenated data
    if case.reduction == "mean":  # the total weight is what the mean over all the data divides by
        assert totals.weight == pytest.approx(float(case.terms(out, Y).sum()) / L, rel=1e-12)
    else:
        assert totals.weight == 3


def test_a_dict_output_needs_output_and_works_with_it():
    """Regression: a model returning a dict without output= gets an error naming output=;
    output="logits" (or a callable) gives the matrices of the logits."""
    case = BY_NAME["dict-bce-pos-weight"]
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    for make in (ck.hessian, ck.ggn, ck.fisher):
        with pytest.raises((LossError, ModelError), match="output='logits'"):
            make(model, loss_fn, batches)
    assert_close(ck.hessian(model, loss_fn, batches, output="logits").dense(), cached_ref("hessian", case.name))
    assert_close(ck.ggn(model, loss_fn, batches, output=lambda o: o["logits"]).dense(), cached_ref("ggn", case.name))
    assert_close(ck.fisher(model, loss_fn, batches, output="logits").dense(), cached_ref("fisher", case.name))
    with pytest.raises(ModelError, match="output='nope' does not select anything.*'logits', 'hidden'"):
        ck.hessian(model, loss_fn, batches, output="nope")


def test_a_tuple_output_hint_names_an_index():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    model = Pair().double()
    data = (randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(LossError, match="output=0"):
        ck.hessian(model, nn.CrossEntropyLoss(), data)
    H = ck.hessian(model, nn.CrossEntropyLoss(), data, output=0)
    assert H.shape == (15, 15)


def test_max_batch_is_checked():
    case = BY_NAME["mlp-ce-mean"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch must be a positive integer"):
            ck.hessian(case.build(), case.loss(), case.batches(), max_batch=bad)


@pytest.mark.parametrize("case", params([c for c in CASES if c.ignore_index == IGNORE][:1]))
def test_loss_and_gradient_with_max_batch(case):
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    whole = Risk(model, loss_fn, batches).loss_and_gradient()
    cut = Risk(model, loss_fn, batches, max_batch=2).loss_and_gradient()
    assert cut[0] == pytest.approx(whole[0], rel=1e-12)
    assert_close(cut[1], whole[1])


@pytest.mark.parametrize("first", [True, False])
def test_a_batch_without_terms_counts_nothing(first):
    """Regression: a "mean" batch whose targets are all ignore_index is 0/0 in torch (a NaN loss);
    it has no terms, so it adds nothing, on the first batch (the check of the loss) or later."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    y[:3] = -100
    data = [(x[:3], y[:3]), (x[3:], y[3:])] if first else [(x[3:], y[3:]), (x[:3], y[:3])]
    CE = nn.CrossEntropyLoss()
    for make in (ck.hessian, ck.ggn, ck.fisher, ck.kfac):
        assert_close(make(model, CE, data).dense(), make(model, CE, [(x, y)]).dense(), tol=1e-12)
    H, H1 = ck.hessian(model, CE, data), ck.hessian(model, CE, [(x, y)])
    (l, g), (l1, g1) = H.loss_and_gradient(), H1.loss_and_gradient()
    assert l == pytest.approx(l1, rel=1e-12) and torch.allclose(g, g1, atol=1e-14)
    with pytest.raises(LossError, match="no terms"):
        ck.hessian(model, CE, [(x[:3], y[:3])]) @ torch.ones(16, dtype=torch.float64)
