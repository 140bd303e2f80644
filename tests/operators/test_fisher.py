"""ck.fisher: the empirical Fisher is the per-term c * sum_t g_t g_t^T on every case; the
Monte-Carlo Fisher's expectation is the GGN."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import curvkit as ck
from curvkit.errors import LossWarning
from cases import (
    BY_NAME, CASES, DT, Flat, assert_buffers_equal, assert_close, buffers_copy, cached_ref, concat, make_batches, make_loss,
    make_model, params, randn, training_flags,
)


@pytest.mark.parametrize("case", params())
def test_empirical_fisher_equals_dense(case):
    model = case.build()
    flags, bufs = training_flags(model), buffers_copy(model)
    Fo = ck.fisher(model, case.loss(), case.batches(), output=case.output)  # kind="empirical" by default
    dense = Fo.dense()
    assert_close(dense, cached_ref("fisher", case.name))
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-10 * evals.max()


def test_empirical_fisher_is_per_term_not_per_example():
    """For a sequence loss a term is a token: the per-example outer products (tokens' gradients
    summed first) are a different matrix, so the reference can tell the two apart."""
    from cases import BY_NAME, ref_per_example

    case = BY_NAME["token_mlp-ce-function-reshape"]
    model, (x, y) = case.build(), concat(case.batches())
    G = ref_per_example(model, case.terms, (x, y))
    per_example = G.T @ G / int((y != case.ignore_index).sum())
    assert (per_example - cached_ref("fisher", case.name)).abs().max() > 1e-3


def test_empirical_fisher_generic_loss():
    """A loss outside the closed forms: its terms are the examples, each the loss on it alone."""
    loss_fn = lambda out, y: F.smooth_l1_loss(out, y, beta=0.7)  # noqa: E731  mean over all elements
    model, batches = make_model("layernorm"), make_batches("layernorm", "mse")
    f = Flat(model)
    X, Y = concat(batches)
    G = []
    for n in range(len(Y)):
        th = f.theta0.clone().requires_grad_(True)
        G.append(torch.autograd.grad(loss_fn(f(th, X[n : n + 1]), Y[n : n + 1]), th)[0])
    G = torch.stack(G)
    # mean loss = (1/N) sum_n l_n with l_n the loss on example n alone (a mean over its outputs)
    assert_close(ck.fisher(model, loss_fn, batches).dense(), G.T @ G / len(Y))


# the basic grid's "sum" cases are its "mean" cases scaled (the same draws): their means suffice
MC = [c for c in CASES if not (c.name.endswith("-sum") and c.name.replace("-sum", "-mean") in BY_NAME)]


@pytest.mark.parametrize("case", params(MC))
def test_mc_fisher_expectation_is_ggn(case):
    """E[v^T F_s v] over seeds s equals v^T G v (for NLL on log-probabilities: the GGN of the
    cross-entropy on the logits), within 4 standard errors of the seed average."""
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    n = sum(p.numel() for p in model.parameters())
    V = randn(n, 4, seed=7)
    exact = (V * (cached_ref("mc", case.name) @ V)).sum(0)
    S = 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossWarning)  # NLL: curvkit warns that its GGN is zero
        samples = torch.stack([(V * (ck.fisher(model, loss_fn, batches, kind="mc", seed=s, mc_samples=2,
                                                output=case.output) @ V)).sum(0) for s in range(S)])
    mean, stderr = samples.mean(0), samples.std(0) / S**0.5
    assert (stderr > 0).all()
    assert ((mean - exact).abs() < 4 * stderr).all(), ((mean - exact) / stderr)
    # and the test has power: the empirical Fisher is a different matrix, many stderrs away
    emp = (V * (cached_ref("fisher", case.name) @ V)).sum(0)
    assert ((emp - exact).abs() > 4 * stderr).any()


def test_mc_fisher_is_one_fixed_matrix_per_seed():
    model, loss_fn, batches = make_model("convbn"), make_loss("ce"), make_batches("convbn", "ce")
    F1 = ck.fisher(model, loss_fn, batches, kind="mc", seed=3, mc_samples=2)
    d1 = F1.dense()
    assert_close(F1.dense(), d1, tol=1e-14)  # every product sees the same samples
    assert_close(d1, d1.T)
    assert torch.linalg.eigvalsh(d1).min() >= -1e-10 * d1.abs().max()
    d1b = ck.fisher(model, loss_fn, batches, kind="mc", seed=3, mc_samples=2).dense()
    assert torch.equal(d1, d1b)
    d2 = ck.fisher(model, loss_fn, batches, kind="mc", seed=4, mc_samples=2).dense()
    assert (d1 - d2).abs().max() > 1e-6
    # a torch.Generator as seed is reproducible too, and so is a large integer seed
    big = ck.fisher(model, loss_fn, batches, kind="mc", seed=2**62 + 1).dense()
    assert torch.equal(big, ck.fisher(model, loss_fn, batches, kind="mc", seed=2**62 + 1).dense())
    g1 = ck.fisher(model, loss_fn, batches, kind="mc", seed=torch.Generator().manual_seed(5)).dense()
    g2 = ck.fisher(model, loss_fn, batches, kind="mc", seed=torch.Generator().manual_seed(5)).dense()
    assert torch.equal(g1, g2)


def test_mc_fisher_mc_samples_average():
    """mc_samples=m is the average of m single-sample Fishers (a product with m draws per example)."""
    model, loss_fn, batches = make_model("mlp"), make_loss("ce"), make_batches("mlp", "ce")
    G = ck.ggn(model, loss_fn, batches)
    V = torch.randn(G.shape[0], 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    exact = (V * (G @ V)).sum(0)
    S = 40
    samples = torch.stack(
        [(V * (ck.fisher(model, loss_fn, batches, kind="mc", seed=s, mc_samples=8) @ V)).sum(0) for s in range(S)]
    )
    mean, stderr = samples.mean(0), samples.std(0) / S**0.5
    assert ((mean - exact).abs() < 4 * stderr).all(), ((mean - exact) / stderr)


def test_mc_pieces_of_a_batch_draw_their_own_samples():
    """Regression: with max_batch, the pieces of a batch continue that batch's random stream (each
    piece restarted it, so all drew the same targets): two identical examples cut into pieces of
    one still get two different draws, as they do in one piece."""
    model = make_model("mlp")
    x, y = randn(1, 4).repeat(2, 1), randn(1, 3, seed=1).repeat(2, 1)
    for cut in (None, 1):
        F_mc = ck.fisher(model, torch.nn.MSELoss(), (x, y), kind="mc", seed=0, max_batch=cut).dense()
        # one term (row) per example: rank 1 each, rank 2 unless both examples drew the same target
        assert int(torch.linalg.matrix_rank(F_mc)) == 2, cut
