"""ck.analyze against exact answers: a linear least-squares model whose Hessian is known in closed
form, and the per-layer/full trace consistency on a small MLP on real digits."""

import json
import math

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit import datasets
from curvkit.analyze import schema

from ._schema import png_size, validate


@pytest.fixture(scope="module")
def least_squares():
    """Linear regression with MSE: H = 2/N [X 1]^T [X 1], computed densely; spread column scales
    give well-separated top eigenvalues."""
    g = torch.Generator().manual_seed(0)
    N, d = 400, 150
    X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.logspace(1, -1, d, dtype=torch.float64)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    data = [(X[i : i + 100], y[i : i + 100]) for i in range(0, N, 100)]
    A = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    H = 2.0 / N * A.T @ A  # parameter order: weight (d), bias (1)
    with torch.no_grad():
        r = model(X) - y
    grad = 2.0 / N * A.T @ r[:, 0]
    report = ck.analyze(model, nn.MSELoss(), data, k=5, probes=60, seed=0, progress=False)
    return report, H, grad


def test_known_hessian_top_eigenvalues_within_residuals(least_squares):
    report, H, _ = least_squares
    exact = torch.linalg.eigvalsh(H).flip(0)[:5]
    for name in ("hessian", "ggn"):  # for MSE on a linear model the GGN is the Hessian
        got = report.to_dict()[name]
        assert got["converged"]
        for lam, val, res in zip(exact.tolist(), got["values"], got["residuals"]):
            # a Ritz value with residual r lies within r of an eigenvalue (symmetric matrix)
            assert abs(lam - val) <= res + 1e-9 * abs(lam), (name, lam, val, res)


def test_known_hessian_trace_within_4_stderr(least_squares):
    report, H, _ = least_squares
    tr = report.trace
    assert tr["stderr"] > 0
    assert abs(tr["value"] - float(H.trace())) < 4 * tr["stderr"]
    (layer,) = report.layers  # a bare nn.Linear is one layer
    assert abs(layer["trace"] - float(H.trace())) < 4 * layer["trace_stderr"]
    assert abs(layer["top_eigenvalue"] - float(torch.linalg.eigvalsh(H)[-1])) <= layer["top_residual"] + 1e-9


def test_known_gradient_fraction(least_squares):
    report, H, grad = least_squares
    lam, U = torch.linalg.eigh(H)
    exact = float((U[:, -5:].T @ grad).square().sum() / grad.square().sum())
    # Davis-Kahan: the Ritz subspace is within angle ||R||_F / gap of the true one, and the
    # fraction (a squared projection norm) moves by at most twice that
    res = torch.tensor(report.hessian["residuals"], dtype=torch.float64)
    bound = 2 * float(res.norm()) / float(lam[-5] - lam[-6])
    assert report.gradient["norm"] == pytest.approx(float(grad.norm()), rel=1e-9)
    assert abs(report.gradient["fraction_in_top_k"] - exact) <= bound, (exact, bound)


def test_density_is_the_known_spectrum_smoothed(least_squares):
    """The density is normalised over its grid, so check what normalising cannot hide: each
    probe's quadrature weights sum to one, the nodes lie in the known spectrum's range, the grid
    holds the smoothed quadrature's whole mass, and the CDF is the exact spectrum's smoothed CDF."""
    report, H, _ = least_squares
    d = report.density
    lam = torch.linalg.eigvalsh(H)
    t, rho = torch.tensor(d["grid"], dtype=torch.float64), torch.tensor(d["density"], dtype=torch.float64)
    nodes, weights, sigma = (torch.tensor(d["nodes"], dtype=torch.float64),
                             torch.tensor(d["weights"], dtype=torch.float64), d["sigma"])
    assert torch.allclose(weights.sum(1), torch.ones(d["probes"], dtype=torch.float64), atol=1e-10)
    assert float(nodes.min()) >= float(lam[0]) - 1e-8 and float(nodes.max()) <= float(lam[-1]) + 1e-8
    Phi = lambda x: 0.5 * (1 + torch.erf((x - nodes) / (sigma * math.sqrt(2))))  # noqa: E731
    mass = float(((Phi(t[-1]) - Phi(t[0])) * weights).sum(1).mean())
    assert 1 - 1e-6 <= mass <= 1 + 1e-10
    raw = (torch.exp(-0.5 * ((t[:, None, None] - nodes[None]) / sigma) ** 2) * weights[None]).sum(-1).mean(1)
    raw = raw / (sigma * math.sqrt(2 * math.pi))
    assert float((rho - raw).abs().max()) <= 1e-4 * float(raw.max())
    assert len(d["density_stderr"]) == len(d["grid"])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(rho, t)])
    q = torch.quantile(lam, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    idx = torch.searchsorted(t, q)
    exact = 0.5 * (1 + torch.erf((t[idx][:, None] - lam[None]) / (sigma * math.sqrt(2)))).mean(1)
    n = H.shape[0]
    tol = 4 * torch.sqrt(2 * exact * (1 - exact) / ((n + 2) * d["probes"])) + 2e-3
    assert ((cdf[idx] - exact).abs() < tol).all(), (cdf[idx] - exact, tol)


@pytest.fixture(scope="module")
def mlp_report():
    x, y = datasets.digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    data = datasets.batches(x[:512], y[:512], 256)
    return ck.analyze(model, nn.CrossEntropyLoss(), data, k=12, probes=24, density_iterations=30,
                      density_probes=3, heldout=(x[512:700], y[512:700]), progress=False)


def test_layer_traces_sum_to_full_trace(mlp_report):
    layers, tr = mlp_report.layers, mlp_report.trace
    assert [b["name"] for b in layers] == ["1", "3"]
    total = sum(b["trace"] for b in layers)
    combined = math.sqrt(sum(b["trace_stderr"] ** 2 for b in layers) + tr["stderr"] ** 2)
    assert abs(total - tr["value"]) < 4 * combined


def test_report_json_validates_and_records_settings(mlp_report):
    doc = json.loads(mlp_report.to_json())
    assert validate(doc, schema()) == []
    s = doc["settings"]
    assert s["mode"] == "eval" and s["seed"] == 0 and s["torch"] == torch.__version__
    assert doc["data"]["examples"] == 512 and doc["data"]["heldout_examples"] == 188
    assert doc["model"]["num_classes"] == 10 and 0 <= doc["accuracy"]["heldout"] <= 1
    assert doc["cost"]["total_products"] == sum(q["products"] for q in doc["cost"]["quantities"].values())


def test_schema_rejects_a_broken_report(mlp_report):
    doc = json.loads(mlp_report.to_json())
    del doc["trace"]["stderr"]
    doc["hessian"]["converged"] = "yes"
    errors = validate(doc, schema())
    assert any("stderr" in e for e in errors) and any("converged" in e for e in errors)


def test_markdown_and_plots(mlp_report, tmp_path):
    md = mlp_report.to_markdown()
    for header in ("| # | Hessian λ |", "| layer | type |", "| setting | value |", "| quantity | operator products |"):
        assert header in md
    paths = mlp_report.save(tmp_path)
    assert sorted(p.name for p in paths) == ["layers.png", "report.json", "report.md", "spectrum.png"]
    for name in ("spectrum.png", "layers.png"):
        w, h = png_size(tmp_path / name)
        assert 600 <= w <= 2000 and 250 <= h <= 1500, (name, w, h)


def test_same_seed_same_report():
    model = nn.Linear(3, 2)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    a = ck.analyze(model, nn.CrossEntropyLoss(), (x, y), k=2, probes=8, density_iterations=5, progress=False)
    b = ck.analyze(model, nn.CrossEntropyLoss(), (x, y), k=2, probes=8, density_iterations=5, progress=False)
    assert a.trace == {**b.trace, "seconds": a.trace["seconds"]}
    assert a.hessian["values"] == b.hessian["values"]


def test_heldout_loss_is_weighted_like_the_operators():
    """Held-out batches are weighted by the loss's terms: CE with ignore_index over uneven
    batches gives the loss of the concatenated held-out data."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(15, 4), torch.randint(0, 3, (15,))
    y[[0, 1, 2, 9]] = -100  # three ignored targets in the first batch, one in the second
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    batches = [(x[:5], y[:5]), (x[5:12], y[5:12]), (x[12:], y[12:])]
    with torch.no_grad():
        ref = float(loss_fn(model(x), y))
    report = ck.analyze(model, loss_fn, batches[:1], heldout=batches, k=2, probes=4, density_probes=2,
                        density_iterations=5, progress=False)
    assert report.loss["heldout"] == pytest.approx(ref, rel=1e-6)
    assert report.data["heldout_examples"] == 15


@pytest.mark.parametrize("probes", [12, 30])
def test_trace_of_a_model_with_frozen_layers_and_buffers_is_within_its_error_bar(probes):
    """Regression: with frozen layers and BatchNorm buffers the report's trace was 5+ of its own
    standard errors off at few probes (Hutch++'s error bar from 4 samples). The analysed
    parameters are the trainable ones; the trace must be within 4 stderr of the dense one, and the
    per-layer traces must cover exactly those parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # running statistics that are not the identity
        model.train()
        model(torch.randn(64, 1, 4, 4, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g))
            for _ in range(2)]
    H = ck.hessian(model, nn.CrossEntropyLoss(), data)
    exact = float(torch.trace(H.dense()))
    report = ck.analyze(model, nn.CrossEntropyLoss(), data, k=3, probes=probes, density_probes=2,
                        density_iterations=10, progress=False)
    tr = report.trace
    assert tr["samples"] >= 10 and abs(tr["value"] - exact) < 4 * tr["stderr"], (tr, exact)
    names = [row["name"] for row in report.layers]
    assert names == ["1", "4", "6"]  # the frozen conv is not analysed; BatchNorm's affine parameters are
    assert sum(row["parameters"] for row in report.layers) == H.shape[0]
