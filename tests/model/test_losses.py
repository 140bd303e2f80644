"""Loss specs: every case's spec computes its loss, its terms, residuals, output Hessian and square
root as the definitions say; the same loss spelled three ways is one spec; what curvkit cannot know
it says (LossWarning) and what is wrong it refuses (LossError)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian as ag_hessian

import curvkit as ck
from curvkit.errors import LossError, LossWarning
from curvkit.model import BCEWithLogits, CrossEntropy, FunctionLoss, MSE, NLL, loss_spec
from cases import (
    BY_NAME, DT, IGNORE, V, Flat, assert_close, concat, make_model, params, randn, ref_empirical_fisher,
    ref_hessian,
)


def _outputs(case):
    model, (x, y) = case.build(), concat(case.batches())
    with torch.no_grad():
        return Flat(model, output=case.output)(Flat(model).theta0, x), y


@pytest.mark.parametrize("case", params())
def test_spec_of_every_case_follows_the_definitions(case):
    out, y = _outputs(case)
    loss_fn, ref = case.loss(), case.ref_loss()
    spec = loss_spec(loss_fn, out, y)
    assert not isinstance(spec, FunctionLoss), spec  # every case's loss is recognised
    # the spec is the same loss, and the reduction factor is what makes loss = c * sum_t l_t
    L = float(ref(out, y))
    assert float(spec(out, y)) == pytest.approx(L, rel=1e-12)
    terms = case.terms(out, y)
    assert float(spec.factor(out, y)) == pytest.approx(L / float(terms.sum()), rel=1e-12)
    assert float(spec.sum_loss(out, y)) == pytest.approx(float(terms.sum()), rel=1e-12)
    # residuals: each position's gradient of its own term (the terms' sum, differentiated)
    o = out.clone().requires_grad_(True)
    (r_ref,) = torch.autograd.grad(case.terms(o, y).sum(), o)
    assert_close(spec.residuals(out, y), r_ref)
    # the output Hessian, factor included, on a block of probes
    H = ag_hessian(lambda z: ref(z.reshape(out.shape), y), out.reshape(-1))
    U = randn(3, *out.shape, seed=1)
    HU = spec.hessian_matmat(out, y, U).reshape(3, -1)
    assert_close(HU, U.reshape(3, -1) @ H)
    # the square root, example by example: sum_j S_j[n] S_j[n]^T = H_out[n, n]
    S = spec.sqrt(out, y)
    per = out[0].numel()
    for n in range(out.shape[0]):
        Sn = S[:, n].reshape(S.shape[0], per)
        block = H[n * per : (n + 1) * per, n * per : (n + 1) * per]
        assert_close(Sn.T @ Sn, block)


def test_token_loss_spellings_are_one_spec_and_one_fisher():
    """Regression: nn.CrossEntropyLoss on (B, V, T), a function on the (B*T, V) reshape and
    CrossEntropy(class_dim=-1) on (B, T, V) have the same terms (the tokens that are not ignored),
    so the same empirical Fisher."""
    case = BY_NAME["token_mlp-ce-function-reshape"]
    model, batches = case.build(), case.batches()

    class Transposed(nn.Module):  # the same network with the class dimension at 1
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x).transpose(1, 2)

    fn = lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE)  # noqa: E731
    F_module = ck.fisher(Transposed(), nn.CrossEntropyLoss(), batches).dense()
    F_function = ck.fisher(model, fn, batches).dense()
    F_spec = ck.fisher(model, CrossEntropy(class_dim=-1), batches).dense()
    assert_close(F_function, F_module)
    assert_close(F_spec, F_module)
    assert_close(F_module, ref_empirical_fisher(model, fn, case.terms, batches))
    x, y = batches[0]
    spec = loss_spec(fn, model(x), y)
    assert isinstance(spec, CrossEntropy) and spec.ignore_index == IGNORE and spec.class_dim == -1


def test_reshaped_token_cross_entropy_weighs_batches_by_tokens():
    """Regression: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=-100) over
    batches whose token counts differ: H @ V does not change with the batching and is the Hessian
    of the mean over all the tokens that are not ignored."""
    case = BY_NAME["token_mlp-ce-function-reshape"]
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    kept = [int((y != IGNORE).sum()) for _, y in batches]
    per_example = [k / len(y) for k, (_, y) in zip(kept, batches)]
    assert len(set(per_example)) == len(per_example)  # each batch a different share of real tokens
    Vs = randn(sum(p.numel() for p in model.parameters()), 3, seed=2)
    HV = ck.hessian(model, loss_fn, batches) @ Vs
    assert_close(HV, ck.hessian(model, loss_fn, case.one_batch()) @ Vs)
    X, Y = concat(batches)

    def mean_over_kept_tokens(out, y):  # written out: the sum over real tokens over their count
        keep = y.reshape(-1) != IGNORE
        logp = out.reshape(-1, V).log_softmax(-1)[keep]
        return -logp.gather(1, y.reshape(-1)[keep][:, None]).sum() / keep.sum()

    assert_close(HV, ref_hessian(model, mean_over_kept_tokens, [(X, Y)]) @ Vs)


def test_unrecognised_function_with_padded_targets_warns_and_terms_fix_it():
    case = BY_NAME["token_mlp-ce-function-reshape"]
    model, batches = case.build(), case.batches()
    # label smoothing is not among the recognised forms: curvkit cannot know the terms
    fn = lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), label_smoothing=0.1)  # noqa: E731
    with pytest.warns(LossWarning, match=r"cannot tell what the loss.*averages over.*FunctionLoss\(fn, terms="):
        H = ck.hessian(model, fn, batches)
    ref = ref_hessian(model, fn, [concat(batches)])
    assert (H.dense() - ref).abs().max() > 1e-3  # weighed by examples: not the mean over the tokens
    declared = FunctionLoss(fn, terms=lambda out, y: (y != IGNORE).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossWarning)
        assert_close(ck.hessian(model, declared, batches).dense(), ref)


def test_torch_modules_become_their_closed_forms():
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    spec = loss_spec(nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum"))
    assert isinstance(spec, CrossEntropy) and spec.reduction == "sum" and spec.ignore_index == 2
    assert spec.label_smoothing == 0.1 and spec.class_weight is w
    assert isinstance(loss_spec(nn.NLLLoss()), NLL) and loss_spec(nn.NLLLoss()).linear
    assert isinstance(loss_spec(nn.MSELoss(reduction="sum")), MSE)
    pw = torch.ones(3, dtype=DT)
    bce = loss_spec(nn.BCEWithLogitsLoss(pos_weight=pw))
    assert isinstance(bce, BCEWithLogits) and bce.pos_weight is pw
    given = CrossEntropy(class_dim=-1)
    assert loss_spec(given) is given
    # a spec is itself a loss
    out, y = randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert float(CrossEntropy()(out, y)) == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-14)


def test_plain_functions_are_recognised_by_value():
    out, y = randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    spec = loss_spec(lambda o, t: F.cross_entropy(o, t, reduction="sum"), out, y)
    assert isinstance(spec, CrossEntropy) and not isinstance(spec, NLL) and spec.reduction == "sum"
    logp = out.log_softmax(1)
    assert isinstance(loss_spec(F.nll_loss, logp, y), NLL)
    target = randn(6, 3, seed=1)
    assert isinstance(loss_spec(lambda o, t: ((o - t) ** 2).mean(), out, target), MSE)
    assert isinstance(loss_spec(F.binary_cross_entropy_with_logits, out, target.sigmoid()), BCEWithLogits)
    huber = loss_spec(lambda o, t: F.huber_loss(o, t), out, target)
    assert isinstance(huber, FunctionLoss)


def test_loss_mistakes_are_loss_errors():
    """Regression: the loss class instead of an instance, a non-scalar reduction, a non-callable."""
    model = make_model("mlp")
    x, y = randn(4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(LossError, match=r"the class CrossEntropyLoss, not a loss; pass an instance: CrossEntropyLoss\(\)"):
        ck.hessian(model, nn.CrossEntropyLoss, (x, y))
    with pytest.raises(LossError, match="pass an instance"):
        loss_spec(nn.MSELoss)
    with pytest.raises(LossError, match="reduction='mean' or 'sum'"):
        loss_spec(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(LossError, match="must be callable"):
        loss_spec("cross_entropy")
    with pytest.raises(LossError, match="kind='empirical' or ck.ggn"):
        FunctionLoss(lambda o, t: (o - t).abs().mean()).sample(x, torch.Generator())
    assert issubclass(LossError, ck.CurvkitError)
