"""K-FAC against the exact GGN (float64) where K-FAC is exact, and its structure elsewhere."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, LossError, ModelError
from cases import CASES, assert_close, layer_slices, params, ref_empirical_fisher, ref_ggn

D = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # inside the root conftest's fork_rng


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)).to(D)


def _cls(n, d=4, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


def _layer_slices(model):
    out, i = [], 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n = sum(p.numel() for p in m.parameters())
            out.append(slice(i, i + n))
            i += n
    return out


def test_single_linear_mse_one_batch_equals_ggn():
    model = nn.Linear(4, 3).to(D)
    x, y = torch.randn(7, 4, dtype=D), torch.randn(7, 3, dtype=D)
    K = ck.kfac(model, nn.MSELoss(), (x, y))
    G = ck.ggn(model, nn.MSELoss(), (x, y))
    assert K.shape == G.shape and K.dtype == D
    torch.testing.assert_close(K.dense(), G.dense(), atol=1e-10, rtol=0)
    v = torch.randn(K.shape[0], dtype=D)
    torch.testing.assert_close(K @ v, G @ v, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.as_tensor(K.to_scipy() @ v.numpy()), K @ v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss(), nn.SmoothL1Loss()])
def test_single_linear_single_example_equals_ggn(loss):
    model = nn.Linear(4, 3).to(D)
    x = torch.randn(1, 4, dtype=D)
    y = torch.tensor([2]) if isinstance(loss, nn.CrossEntropyLoss) else torch.rand(1, 3, dtype=D)
    torch.testing.assert_close(ck.kfac(model, loss, (x, y)).dense(), ck.ggn(model, loss, (x, y)).dense(),
                               atol=1e-10, rtol=0)


def test_deep_net_batch_one_blocks_are_exact_and_off_diagonal_zero():
    model = _mlp()
    x, y = _cls(1)
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).dense()
    G = ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense()
    sl = _layer_slices(model)
    for i, a in enumerate(sl):
        torch.testing.assert_close(K[a, a], G[a, a], atol=1e-10, rtol=0)
        for b in sl[i + 1:]:
            assert K[a, b].abs().max() == 0 and K[b, a].abs().max() == 0
    assert G[sl[0], sl[1]].abs().max() > 1e-3  # the GGN itself couples the layers


def test_batching_does_not_change_the_operator_and_factors_are_psd():
    model = _mlp()
    x, y = _cls(12)
    one = ck.kfac(model, nn.CrossEntropyLoss(), (x, y))
    three = ck.kfac(model, nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])])
    torch.testing.assert_close(one.dense(), three.dense(), atol=1e-12, rtol=0)
    for name, (A, G) in one.factors.items():
        assert A.shape[0] in (5, 6, 4) and G.shape[0] in (5, 3)
        assert torch.linalg.eigvalsh(A).min() > -1e-12 and torch.linalg.eigvalsh(G).min() > -1e-12
    assert list(one.factors) == ["0", "2", "4"]


def test_inverse_undoes_the_damped_operator():
    model = _mlp()
    x, y = _cls(9)
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y))
    lam = 1e-3
    V = torch.randn(K.shape[0], 4, dtype=D)
    KV = K @ V + lam * V
    torch.testing.assert_close(K.inverse(lam) @ KV, V, atol=1e-10, rtol=0)
    dense = K.dense() + lam * torch.eye(K.shape[0], dtype=D)
    torch.testing.assert_close(K.inverse(lam).dense(), torch.linalg.inv(dense), atol=1e-8, rtol=1e-8)
    with pytest.raises(ArgumentError, match="damping"):
        K.inverse(0.0)


def test_params_subset_is_a_restriction_of_the_full_operator():
    model = _mlp()
    x, y = _cls(6)
    full = ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).dense()
    # the first layer's weight only and the last layer whole: indices 0..19 and 40..51
    sub = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), params=["0.weight", "4.weight", "4.bias"])
    idx = torch.cat([torch.arange(0, 20), torch.arange(40, 52)])
    assert sub.shape == (32, 32)
    torch.testing.assert_close(sub.dense(), full[idx][:, idx], atol=1e-12, rtol=0)
    blocks = ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).blocks("param")
    torch.testing.assert_close(blocks["0.bias"].dense(), full[20:25, 20:25], atol=1e-12, rtol=0)


def _conv_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).to(D)


def test_conv_with_one_output_position_and_one_example_is_exact():
    model = _conv_net()  # 3x3 input, 3x3 kernel: one output position
    x, y = torch.randn(1, 2, 3, 3, dtype=D), torch.tensor([1])
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).dense()
    G = ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense()
    sl = _layer_slices(model)
    for a in sl:
        torch.testing.assert_close(K[a, a], G[a, a], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding="same"),
                                dict(padding="valid", bias=False)])
def test_kfc_is_exact_for_a_conv_under_squared_error_on_its_outputs(kw):
    # g is a constant per output position under MSE, so KFC's A (x) G equals the GGN
    # for any batch and any number of positions: checks unfolding, padding, stride, dilation and T
    model = nn.Conv2d(2, 3, 3, **kw).to(D)
    x = torch.randn(3, 2, 5, 5, dtype=D)
    y = torch.randn_like(model(x))
    torch.testing.assert_close(ck.kfac(model, nn.MSELoss(), (x, y)).dense(),
                               ck.ggn(model, nn.MSELoss(), (x, y)).dense(), atol=1e-10, rtol=0)


def test_conv_covering_its_input_equals_the_equivalent_linear():
    conv = nn.Conv2d(2, 3, 3).to(D)
    lin = nn.Linear(18, 3).to(D)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(3, -1))
        lin.bias.copy_(conv.bias)
    x, y = torch.randn(6, 2, 3, 3, dtype=D), torch.randint(0, 3, (6,))
    Kc = ck.kfac(nn.Sequential(conv, nn.Flatten()), nn.CrossEntropyLoss(), (x, y)).dense()
    Kl = ck.kfac(nn.Sequential(nn.Flatten(), lin), nn.CrossEntropyLoss(), (x, y)).dense()
    torch.testing.assert_close(Kc, Kl, atol=1e-12, rtol=0)


def test_sequence_cross_entropy_single_example_is_exact_per_position_block():
    # Linear over (1, T, d) with CE over (1, C, T): K-FAC-expand with T rows; exact only if T = 1,
    # so check T = 1 against the GGN and that T > 1 runs with the right shapes
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).transpose(1, 2)

    model = Seq().to(D)
    x, y = torch.randn(1, 1, 4, dtype=D), torch.tensor([[2]])
    torch.testing.assert_close(ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).dense(),
                               ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense(), atol=1e-10, rtol=0)
    K = ck.kfac(model, nn.CrossEntropyLoss(), (torch.randn(2, 5, 4, dtype=D), torch.randint(0, 3, (2, 5))))
    assert K.dense().shape == (15, 15)


def test_mc_factors_converge_to_type2_within_standard_error():
    model = _mlp()
    x, y = _cls(16)
    exact = ck.kfac(model, nn.CrossEntropyLoss(), (x, y)).factors
    runs = [ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="mc", seed=s, mc_samples=4).factors
            for s in range(30)]
    for name, (A, G) in exact.items():
        torch.testing.assert_close(runs[0][name][0], A, atol=1e-14, rtol=0)  # A does not depend on the type
        traces = torch.stack([r[name][1].trace() for r in runs])
        err = (traces.mean() - G.trace()).abs()
        stderr = traces.std() / len(traces) ** 0.5
        assert err < 4 * stderr, (name, float(err), float(stderr))
    same = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="mc", seed=3, mc_samples=4).factors
    assert all(torch.equal(same[n][1], runs[3][n][1]) for n in same)


def test_empirical_kfac_equals_empirical_fisher_for_one_example():
    model = nn.Linear(4, 3).to(D)
    x, y = torch.randn(1, 4, dtype=D), torch.tensor([0])
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="empirical").dense()
    F = ck.fisher(model, nn.CrossEntropyLoss(), (x, y), kind="empirical").dense()
    torch.testing.assert_close(K, F, atol=1e-10, rtol=0)


def test_unsupported_layer_is_named_and_can_be_left_out():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(D)
    x, y = _cls(5)
    with pytest.raises(ModelError, match=r"'1' is a LayerNorm"):
        ck.kfac(model, nn.CrossEntropyLoss(), (x, y))
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y), params=lambda n: not n.startswith("1."))
    assert K.shape == (25 + 18, 25 + 18)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).to(D)
    with pytest.raises(ModelError, match="groups=2"):
        ck.kfac(grouped, nn.MSELoss(), (torch.randn(2, 2, 3, 3, dtype=D), torch.randn(2, 2, dtype=D)))


def test_weight_sharing_is_refused():
    lin = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = lin, nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.lin(torch.tanh(self.lin(x))))

    x, y = _cls(3)
    with pytest.raises(ModelError, match="called more than once"):
        ck.kfac(Twice().to(D), nn.CrossEntropyLoss(), (x, y))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(D)
    tied[2].weight = tied[0].weight
    with pytest.raises(ModelError, match="tied"):
        ck.kfac(tied, nn.MSELoss(), (x, torch.randn(3, 4, dtype=D)))


def test_bad_arguments():
    model = nn.Linear(4, 3).to(D)
    x, y = _cls(3)
    with pytest.raises(ArgumentError, match="kind must be"):
        ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="type-1")
    with pytest.raises(ArgumentError, match="mc_samples"):
        ck.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="mc", mc_samples=0)
    with pytest.raises(LossError):
        ck.kfac(model, nn.SmoothL1Loss(), (x, torch.randn(3, 3, dtype=D)), kind="mc")


def test_bf16_model_keeps_float32_factors():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    x, y = _cls(8)
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x.to(torch.bfloat16), y))
    assert all(A.dtype == torch.float32 and G.dtype == torch.float32 for A, G in K.factors.values())
    v = torch.randn(K.shape[0], dtype=torch.bfloat16)
    # products come out in the factors' float32, as the exact operators' do for a bf16 model
    assert (K @ v).dtype == torch.float32 and torch.isfinite(K.inverse(1e-2) @ v).all()


# ---------------------------------------------------------------------------------------------
# the shared cases: where K-FAC is exact, where it must refuse
EXACT = [c for c in CASES if c.kfac == "exact"]


@pytest.mark.parametrize("case", params(EXACT))
def test_one_datum_gives_the_ggn_layer_blocks(case):
    """One example (one position of a sequence): each layer's K-FAC block is that layer's block of
    the exact GGN (from J^T H_out J), the blocks between layers are zero, and the empirical kind's
    blocks are the empirical Fisher's."""
    model, datum = case.build(), case.datum()
    K = ck.kfac(model, case.loss(), datum, params=case.kfac_params, output=case.output)
    G = ref_ggn(model, case.ref_loss(), datum, names=K.param_names, output=case.output)
    Kd = K.dense()
    blocks = layer_slices(model, K.param_names)
    assert list(blocks) == list(K.factors)
    for a in blocks.values():
        assert_close(Kd[a, a], G[a, a])
        for b in blocks.values():
            if b != a:
                assert Kd[a, b].abs().max() == 0
    assert G.abs().max() > 1e-3
    # the empirical kind on one datum (one term): the empirical Fisher's layer blocks
    E = ck.kfac(model, case.loss(), datum, params=case.kfac_params, output=case.output, kind="empirical").dense()
    Fr = ref_empirical_fisher(model, case.ref_loss(), case.terms, datum, names=K.param_names, output=case.output)
    for a in blocks.values():
        assert_close(E[a, a], Fr[a, a])


@pytest.mark.parametrize("case", params(EXACT))
def test_rebatching_and_max_batch_do_not_change_kfac(case):
    model, loss_fn = case.build(), case.loss()
    one = ck.kfac(model, loss_fn, case.one_batch(), params=case.kfac_params, output=case.output).dense()
    uneven = ck.kfac(model, loss_fn, case.batches(), params=case.kfac_params, output=case.output).dense()
    cut = ck.kfac(model, loss_fn, case.batches(), params=case.kfac_params, output=case.output, max_batch=2).dense()
    assert_close(uneven, one)
    assert_close(cut, one)


@pytest.mark.parametrize("case", params([c for c in CASES if c.kfac == "refused"]))
def test_weight_sharing_and_tying_are_refused(case):
    with pytest.raises(ModelError, match="called more than once|tied"):
        ck.kfac(case.build(), case.loss(), case.batches(), output=case.output)


def test_inplace_relu_after_a_layer_keeps_the_type2_blocks_exact():
    """Regression: Linear -> ReLU(inplace=True) -> Linear under MSE, one datum: K-FAC's blocks are
    the GGN's (the hook once read the output gradient after the in-place ReLU: 33% off)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(D)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 4, generator=g, dtype=D), torch.randn(1, 3, generator=g, dtype=D)
    with torch.no_grad():
        assert 0 < int((model[0](x) > 0).sum()) < 6  # some units active, some not: the ReLU matters
    K = ck.kfac(model, nn.MSELoss(), (x, y)).dense()
    G = ref_ggn(model, nn.MSELoss(), [(x, y)])
    for a in layer_slices(model, [n for n, _ in model.named_parameters()]).values():
        assert_close(K[a, a], G[a, a])


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: the weight stored (in, out), ``x W + b`` by addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_gpt2_conv1d_is_exact_for_one_datum():
    """Regression: a transposed linear layer (GPT-2's Conv1D) is a K-FAC layer, and exact on one datum."""
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).to(D)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 4, generator=g, dtype=D), torch.tensor([2])
    K = ck.kfac(model, nn.CrossEntropyLoss(), (x, y))
    assert {name: G.shape[0] for name, (_, G) in K.factors.items()} == {"0": 5, "2": 3}  # out, not in
    G = ref_ggn(model, nn.CrossEntropyLoss(), [(x, y)])
    Kd = K.dense()
    blocks = list(layer_slices(model, K.param_names).values())
    for a in blocks:
        assert_close(Kd[a, a], G[a, a])
    assert Kd[blocks[0], blocks[1]].abs().max() == 0 and G[blocks[0], blocks[1]].abs().max() > 1e-3
    # and on a batch it is the same approximation as the equivalent nn.Linear layers
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(model[i].weight.T)
            lin[i].bias.copy_(model[i].bias)
    xb, yb = torch.randn(6, 4, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g)
    for (a, (A1, G1)), (b, (A2, G2)) in zip(ck.kfac(model, nn.CrossEntropyLoss(), (xb, yb)).factors.items(),
                                            ck.kfac(lin, nn.CrossEntropyLoss(), (xb, yb)).factors.items()):
        assert_close(A1, A2)
        assert_close(G1, G2)


def test_mc_pieces_of_a_batch_draw_their_own_samples():
    """Regression: with max_batch the pieces of a batch continue its random stream (each restarted
    it, so all drew the same targets): two identical examples in pieces of one draw two targets."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 4, generator=g, dtype=D).repeat(2, 1), torch.randn(1, 3, generator=g, dtype=D).repeat(2, 1)
    for cut in (None, 1):
        _, G = ck.kfac(model, nn.MSELoss(), (x, y), kind="mc", seed=0, max_batch=cut).factors["2"]
        assert int(torch.linalg.matrix_rank(G)) == 2, cut  # one residual per example: rank 1 each
