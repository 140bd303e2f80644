"""curvkit.influence: exactness against dense float64 references, the sign convention on a toy
with a known answer, and bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvkit as ck
from curvkit import influence
from curvkit.errors import ArgumentError, DataError, ModelError, NonFiniteError, ShapeError, TooLargeError
from curvkit.model import layers

D = torch.float64


def _mlp(seed=0, norm=False):
    torch.manual_seed(seed)
    mods = [nn.Linear(3, 4), nn.Tanh()] + ([nn.LayerNorm(4)] if norm else []) + [nn.Linear(4, 3)]
    return nn.Sequential(*mods).to(D)


def _data(n=12, seed=1, d=3, c=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


def _flat_grads(model, lossf, x, y):
    """Per-example gradients by a plain autograd loop (the reference)."""
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        lossf(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            parts[n] = t[i : i + k].reshape(s)
            i += k
        return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    return hessian(loss)(theta)


def _dense_ggn(model, x, y):
    """J^T (d2 loss / d out2) J of the mean cross-entropy, from the Jacobian and softmax."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([J[n].reshape(len(y), -1, J[n][0, 0].numel()) for n in params], dim=2)  # (N, C, n)
    p = model(x).softmax(1).detach()
    Hout = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(y)
    return torch.einsum("nci,ncd,ndj->ij", J, Hout, J)


# --- the sign convention, on a toy where the answer is known -----------------------------------
def test_sign_matches_retraining_ridge_regression():
    """Upweighting example i by eps moves the query loss by -eps * score (exactly to first order
    for least squares, where the Hessian of the damped objective is H + damping I)."""
    g = torch.Generator().manual_seed(0)
    N, lam = 15, 0.1
    X, Y = torch.randn(N, 3, generator=g, dtype=D), torch.randn(N, 1, generator=g, dtype=D)
    xq, yq = torch.randn(2, 3, generator=g, dtype=D), torch.randn(2, 1, generator=g, dtype=D)
    Xt = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)

    def ridge(i=None, eps=0.0):  # argmin of mean (x~ theta - y)^2 + lam/2 |theta|^2 + eps (x~_i theta - y_i)^2
        A = 2 / N * Xt.T @ Xt + lam * torch.eye(4, dtype=D)
        b = 2 / N * Xt.T @ Y
        if i is not None:
            A = A + 2 * eps * Xt[i : i + 1].T @ Xt[i : i + 1]
            b = b + 2 * eps * Xt[i : i + 1].T * Y[i]
        return torch.linalg.solve(A, b)

    model = nn.Linear(3, 1).to(D)
    th = ridge()
    with torch.no_grad():
        model.weight.copy_(th[:3].T)
        model.bias.copy_(th[3])
    S = influence.Exact(model, nn.MSELoss(), (X, Y), damping=lam, curvature="hessian").fit().scores((xq, yq))
    xqt = torch.cat([xq, torch.ones(2, 1, dtype=D)], 1)
    eps = 1e-5
    for i in range(N):
        up, down = ridge(i, eps), ridge(i, -eps)
        dloss = (((xqt @ up - yq) ** 2) - ((xqt @ down - yq) ** 2))[:, 0] / (2 * eps)
        assert torch.allclose(S[:, i], -dloss, rtol=1e-7, atol=1e-9)
    assert (S > 0).any() and (S < 0).any()  # both helpful and harmful examples exist here


# --- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_equals_closed_form(curvature):
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(4, seed=7)
    lam = 0.05 if curvature == "ggn" else 0.5
    H = (_dense_hessian if curvature == "hessian" else _dense_ggn)(model, x, y)
    lossf = nn.CrossEntropyLoss(reduction="sum")
    Gq, Gt = _flat_grads(model, lossf, xq, yq), _flat_grads(model, lossf, x, y)
    ref = Gq @ torch.linalg.solve(H + lam * torch.eye(len(H), dtype=D), Gt.T)
    inf = influence.Exact(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])], damping=lam,
                          curvature=curvature).fit()
    assert torch.allclose(inf.scores((xq, yq)), ref, atol=1e-10, rtol=1e-10)
    own = (Gt @ torch.linalg.solve(H + lam * torch.eye(len(H), dtype=D), Gt.T)).diagonal()
    assert torch.allclose(inf.self_influence(), own, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("loss,n", [("mse", 12), ("ce", 1)])
def test_ekfac_equals_exact_where_kfac_is_exact(loss, n):
    """A single linear layer: under MSE the output Hessian is constant, so K-FAC equals the GGN for
    any batch; under cross-entropy only for one example."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(D)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = torch.randn(n, 2, generator=g, dtype=D) if loss == "mse" else torch.randint(0, 2, (n,), generator=g)
    lossf = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    xq = torch.randn(3, 3, generator=g, dtype=D)
    yq = torch.randn(3, 2, generator=g, dtype=D) if loss == "mse" else torch.randint(0, 2, (3,), generator=g)
    ek = influence.EKFAC(model, lossf, (x, y), damping=1e-2).fit()
    ex = influence.Exact(model, lossf, (x, y), damping=1e-2).fit()
    assert torch.allclose(ek.scores((xq, yq)), ex.scores((xq, yq)), atol=1e-10, rtol=1e-10)
    assert torch.allclose(ek.self_influence(), ex.self_influence(), atol=1e-10, rtol=1e-10)


def test_ekfac_differs_from_exact_when_kfac_is_not():
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(3, 3).to(D), _data(12)
    ek = influence.EKFAC(model, nn.CrossEntropyLoss(), (x, y), damping=1e-2).fit().self_influence()
    ex = influence.Exact(model, nn.CrossEntropyLoss(), (x, y), damping=1e-2).fit().self_influence()
    assert (ek - ex).abs().max() > 1e-3 * ex.abs().max()


def _check_correction(model, lossf, data, kind="type-2"):
    """EK-FAC's eigenvalues are the dense GGN's (empirical Fisher's) diagonal in the K-FAC
    eigenbasis (identity basis for the diagonal parameters), whatever the model."""
    ek = influence.EKFAC(model, lossf, data, damping=1e-3, kind=kind).fit()
    Gd = (ck.ggn(model, lossf, data) if kind == "type-2" else ck.fisher(model, lossf, data, kind=kind)).dense()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offs = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
    eig = ck.kfac(model, lossf, data, [n for l in layers(model) if l.is_matrix for n in l.param_names], kind=kind).eigen() \
        if any(l.is_matrix for l in layers(model)) else {}
    checked = 0
    for layer in layers(model):
        if layer.is_matrix:
            _, QA, _, QG = eig[layer.name]
            out, cols = QG.shape[0], QA.shape[0]
            E = (QG.T[:, None, :, None] * QA.T[None, :, None, :]).reshape(out * cols, out, cols)  # basis matrices
            parts = layer.from_matrix(E)
            B = torch.zeros(len(Gd), out * cols, dtype=D)
            for name, part in zip(layer.kron_params(), parts):
                B[offs[name] : offs[name] + part[0].numel()] = part.reshape(out * cols, -1).T
            ref = ((B.T @ Gd) * B.T).sum(1).reshape(out, cols)
            assert torch.allclose(ek.eigenvalues[layer.name], ref, atol=1e-12, rtol=1e-10)
        else:
            for name in layer.param_names:
                k = dict(zip(names, sizes))[name]
                ref = Gd.diagonal()[offs[name] : offs[name] + k]
                assert torch.allclose(ek.eigenvalues[name].reshape(-1), ref, atol=1e-12, rtol=1e-10)
        checked += 1
    assert checked == len(layers(model))


@pytest.mark.parametrize("kind", ["type-2", "empirical"])
def test_ekfac_correction_is_ggn_diagonal_in_the_eigenbasis_mlp_layernorm(kind):
    model, (x, y) = _mlp(norm=True), _data()
    _check_correction(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])], kind=kind)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 3), nn.Linear(3, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)))


def test_ekfac_tied_embedding_is_diagonal_and_exact_on_it():
    torch.manual_seed(0)
    model = _Tied().to(D)
    g = torch.Generator().manual_seed(4)
    tok, y = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    _check_correction(model, nn.CrossEntropyLoss(), (tok, y))


def test_ekfac_correction_conv2d_and_embedding():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3)).to(D)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 2, 4, 4, generator=g, dtype=D), torch.randint(0, 3, (5,), generator=g)
    _check_correction(conv, nn.CrossEntropyLoss(), (x, y))
    emb = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).to(D)
    tok = torch.randint(0, 7, (6, 2), generator=g)
    _check_correction(emb, nn.MSELoss(), (tok, torch.randn(6, 2, generator=g, dtype=D)))


def test_cg_equals_exact_and_reports_convergence():
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(3, seed=5)
    cg = influence.CG(model, nn.CrossEntropyLoss(), (x, y), damping=0.1, tol=1e-11).fit()
    ex = influence.Exact(model, nn.CrossEntropyLoss(), (x, y), damping=0.1).fit()
    S, R = cg.scores((xq, yq)), ex.scores((xq, yq))
    assert cg.converged and all(r.residual <= 1e-11 for r in cg.solves)
    assert torch.allclose(S, R, rtol=1e-8, atol=1e-8 * R.abs().max())


def test_lissa_converges_to_exact_and_detects_divergence():
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(2, seed=5)
    ex = influence.Exact(model, nn.CrossEntropyLoss(), (x, y), damping=0.5).fit()
    li = influence.LiSSA(model, nn.CrossEntropyLoss(), (x, y), damping=0.5, depth=3000, tol=1e-13).fit()
    R = ex.scores((xq, yq))
    assert torch.allclose(li.scores((xq, yq)), R, rtol=1e-9, atol=1e-9 * R.abs().max())
    assert li.convergence[-1] <= 1e-13
    top = float(ex.eigenvalues.max()) + 0.5
    bad = influence.LiSSA(model, nn.CrossEntropyLoss(), (x, y), damping=0.5, depth=3000, scale=0.4 * top).fit()
    with pytest.raises(NonFiniteError, match="scale"):
        bad.scores((xq, yq))


def test_tracin_one_checkpoint_is_identity_and_sums_checkpoints():
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(3, seed=5)
    now = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.1 for k, v in now.items()}
    ident = influence.Identity(model, nn.CrossEntropyLoss(), (x, y)).fit()
    S0 = ident.scores((xq, yq))
    tr = influence.TracIn(model, nn.CrossEntropyLoss(), (x, y), [now]).fit()
    assert torch.equal(tr.scores((xq, yq)), S0)
    assert torch.equal(tr.self_influence(), ident.self_influence())
    model.load_state_dict(other)
    S1 = influence.Identity(model, nn.CrossEntropyLoss(), (x, y)).fit().scores((xq, yq))
    model.load_state_dict(now)
    tr2 = influence.TracIn(model, nn.CrossEntropyLoss(), (x, y), [now, other], lr=[0.5, 2.0]).fit()
    assert torch.allclose(tr2.scores((xq, yq)), 0.5 * S0 + 2.0 * S1, atol=1e-12)
    assert all(torch.equal(v, now[k]) for k, v in model.state_dict().items())  # weights restored
    lossf = nn.CrossEntropyLoss(reduction="sum")
    assert torch.allclose(S0, _flat_grads(model, lossf, xq, yq) @ _flat_grads(model, lossf, x, y).T, atol=1e-12)


def test_measurement_and_top():
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(3, seed=5)

    def margin(out, t):
        return out.gather(1, t[:, None])[:, 0] - out.logsumexp(1)

    S = influence.Identity(model, nn.CrossEntropyLoss(), (x, y), measurement=margin).fit().scores((xq, yq))
    # margin = -(per-example cross-entropy): its gradient is minus the loss gradient
    Gt = _flat_grads(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    Gq = _flat_grads(model, nn.CrossEntropyLoss(reduction="sum"), xq, yq)
    assert torch.allclose(S, -Gq @ Gt.T, atol=1e-12)
    ex = influence.Exact(model, nn.CrossEntropyLoss(), (x, y), damping=0.1).fit()
    t, full = ex.top((xq, yq), k=4), ex.scores((xq, yq))
    order = full.argsort(dim=1, descending=True)
    assert torch.equal(t.helpful, order[:, :4]) and torch.equal(t.harmful, order.flip(1)[:, :4])
    assert torch.equal(t.helpful_scores, full.gather(1, order[:, :4]))
    assert (t.harmful_scores <= t.helpful_scores[:, -1:]).all()


def test_scores_stream_to_a_memmap(tmp_path):
    model, (x, y) = _mlp(), _data()
    xq, yq = _data(5, seed=5)
    ek = influence.EKFAC(model, nn.CrossEntropyLoss(), (x, y), damping=0.1).fit()
    S = ek.scores((xq, yq))
    with pytest.raises(TooLargeError, match="out="):
        ek.scores((xq, yq), max_bytes=64)
    queries = [(xq[:2], yq[:2]), (xq[2:], yq[2:])]
    mm = ek.scores(queries, out=tmp_path / "s.npy", max_bytes=64)
    assert isinstance(mm, np.memmap) and mm.shape == (5, 12)
    assert np.allclose(np.load(tmp_path / "s.npy"), S.numpy(), atol=1e-12)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input():
    model, (x, y) = _mlp(), _data()
    inf = influence.EKFAC(model, nn.CrossEntropyLoss(), [(x, y)], damping=0.1).fit()
    with pytest.raises(ShapeError, match="shaped like one training example"):
        inf.scores((torch.randn(2, 4, dtype=D), y[:2]))
    with pytest.raises(ModelError, match="fit"):
        influence.Exact(model, nn.CrossEntropyLoss(), (x, y)).scores((x[:1], y[:1]))
    x[0, 0] += 1.0  # the training set changes after fit
    with pytest.raises(DataError, match="training data changed"):
        inf.self_influence()
    x[0, 0] -= 1.0
    with torch.no_grad():
        model[0].weight[0, 0] += 0.1
    with pytest.raises(ModelError, match="parameters changed"):
        inf.scores((x[:1], y[:1]))
    # 31 parameters, 4 examples x 2 independent output directions: the GGN is singular
    with pytest.raises(ArgumentError, match="damping >"):
        influence.Exact(model, nn.CrossEntropyLoss(), (x[:4], y[:4]), damping=0.0).fit()
    with pytest.raises(ArgumentError, match="damping"):
        influence.EKFAC(model, nn.CrossEntropyLoss(), (x, y), damping=-1.0)
    rnn = nn.Sequential(nn.Conv1d(3, 2, 1), nn.Flatten(), nn.Linear(2, 3)).to(D)
    with pytest.raises(ModelError, match="embedding") as e:
        influence.EKFAC(rnn, nn.CrossEntropyLoss(), (x[:, :, None], y))
    assert "Conv1d" in str(e.value) and "conv2d" in str(e.value)
    with pytest.raises(ArgumentError, match="k must be"):
        inf.top((x[:1], y[:1]), k=0)


def test_readme_section_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Influence functions") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["S"].shape == (10, 500) and scope["best"].helpful.shape == (10, 3)
    assert len(scope["suspects"]) == 25
