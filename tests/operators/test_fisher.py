"""ck.fisher: the empirical Fisher equals c * sum_n g_n g_n^T; the MC Fisher's expectation is the GGN."""

import pytest
import torch
import torch.nn.functional as F

import curvkit as ck

from .reference import (
    DT, GRID, Flat, assert_buffers_equal, assert_close, buffers_copy, cached_ref, case, concat, make_batches,
    make_loss, make_model, training_flags,
)


@pytest.mark.parametrize("kind, loss, reduction, one_batch", GRID)
def test_empirical_fisher_equals_dense(kind, loss, reduction, one_batch):
    model, loss_fn, data = case(kind, loss, reduction, one_batch)
    flags, bufs = training_flags(model), buffers_copy(model)
    Fo = ck.fisher(model, loss_fn, data[0] if one_batch else data)  # kind="empirical" by default
    dense = Fo.dense()
    assert_close(dense, cached_ref("fisher", kind, loss, reduction))
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-10 * evals.max()


def test_empirical_fisher_generic_loss():
    """A loss outside the closed forms: the per-example term is the loss on that example alone."""
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


def test_empirical_fisher_ce_label_smoothing_and_ignore_index():
    """Closed-form CE residuals with label smoothing and ignored targets, on one batch."""
    model = make_model("mlp")
    x, y = concat(make_batches("mlp", "ce"))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=1)
    per_example = torch.nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=1, reduction="sum")
    f = Flat(model)
    keep = [n for n in range(len(y)) if int(y[n]) != 1]
    assert 0 < len(keep) < len(y)
    G = []
    for n in keep:  # ignored examples have no NLL term; the mean is over the kept ones
        th = f.theta0.clone().requires_grad_(True)
        G.append(torch.autograd.grad(per_example(f(th, x[n : n + 1]), y[n : n + 1]), th)[0])
    G = torch.stack(G)
    assert_close(ck.fisher(model, loss_fn, (x, y)).dense(), G.T @ G / len(keep))


def _ce_ignored(y):
    y = y.clone()
    y[::3] = -100  # every third target ignored (padding)
    return y


MC_CASES = {
    "ce": (make_loss("ce"), "ce", None),
    "mse": (make_loss("mse"), "mse", None),
    "bce": (make_loss("bce"), "bce", None),
    # the likelihood is the softmax: no smoothing in the sampled targets, no ignored positions
    "ce-ignore-index": (torch.nn.CrossEntropyLoss(), "ce", _ce_ignored),
    "ce-label-smoothing": (torch.nn.CrossEntropyLoss(label_smoothing=0.3), "ce", None),
}


@pytest.mark.parametrize("case_name", list(MC_CASES))
def test_mc_fisher_expectation_is_ggn(case_name):
    """E[v^T F_s v] over seeds s equals v^T G v, within 4 standard errors of the seed average."""
    loss_fn, loss, edit = MC_CASES[case_name]
    model = make_model("mlp")
    x, y = concat(make_batches("mlp", loss))
    batches = [(x, edit(y) if edit else y)]  # one batch of 15: the expectation is per example
    G = ck.ggn(model, loss_fn, batches)
    n = G.shape[0]
    V = torch.randn(n, 6, generator=torch.Generator().manual_seed(7), dtype=DT)
    exact = (V * (G @ V)).sum(0)
    S = 80
    samples = torch.stack([(V * (ck.fisher(model, loss_fn, batches, kind="mc", seed=s) @ V)).sum(0) for s in range(S)])
    mean, stderr = samples.mean(0), samples.std(0) / S**0.5
    assert (stderr > 0).all()
    assert ((mean - exact).abs() < 4 * stderr).all(), ((mean - exact) / stderr)
    # and the test has power: the empirical Fisher is a different matrix, many stderrs away
    emp = (V * (ck.fisher(model, loss_fn, batches) @ V)).sum(0)
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


class _Seg(torch.nn.Module):
    """Per-pixel logits (N, 3, 2, 2): cross-entropy over dim 1 with (N, 2, 2) class targets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 3, 2), torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_spatial_cross_entropy(reduction):
    """CE with extra output dims: one loss term per pixel, and the empirical Fisher sums the outer
    products of the pixels' own gradients (the terms, as for a sequence's tokens)."""
    from .reference import ref_ggn, ref_hessian

    torch.manual_seed(0)
    model = _Seg().double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 1, 3, 3, generator=g, dtype=DT), torch.randint(0, 3, (n, 2, 2), generator=g))
               for n in (4, 3, 2)]
    loss_fn = make_loss("ce", reduction)
    assert_close(ck.hessian(model, loss_fn, batches).dense(), ref_hessian(model, loss_fn, batches))
    G = ck.ggn(model, loss_fn, batches)
    assert_close(G.dense(), ref_ggn(model, loss_fn, batches))
    f = Flat(model)
    X, Y = concat(batches)
    per_term = make_loss("ce", "sum")
    grads = []
    for n in range(len(Y)):
        for i in range(2):
            for j in range(2):
                th = f.theta0.clone().requires_grad_(True)
                logits = f(th, X[n : n + 1])[:, :, i, j]
                grads.append(torch.autograd.grad(per_term(logits, Y[n : n + 1, i, j]), th)[0])
    grads = torch.stack(grads)
    c = 1 / Y.numel() if reduction == "mean" else 1.0  # one term per pixel
    assert_close(ck.fisher(model, loss_fn, batches).dense(), c * grads.T @ grads)
