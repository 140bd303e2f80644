"""The shared machinery: probes in blocks, product paths, params=, composition, data, modes, errors."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit as ck
from curvkit.errors import DataError, LossError, LossWarning, ModelError, NonFiniteError, ShapeError, TooLargeError
from curvkit.operators import HessianOperator

from cases import (
    BY_NAME, DT, MLP, assert_buffers_equal, assert_close, buffers_copy, cached_ref, concat, make_batches, make_loss,
    make_model, mse_terms, params, randn, ref_empirical_fisher, ref_ggn, ref_hessian, training_flags,
)

CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------
# blocks of probes and the product paths
@pytest.mark.parametrize("make", [ck.hessian, ck.ggn, ck.fisher])
def test_block_product_equals_columns(make):
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    A = make(model, CE, batches)
    V = randn(A.shape[0], 5)
    AV = A @ V
    assert AV.shape == V.shape
    cols = torch.stack([A @ V[:, j] for j in range(5)], dim=1)
    assert (A @ V[:, 0]).shape == (A.shape[0],)
    assert_close(AV, cols, tol=1e-12)


def test_hessian_paths_agree():
    """vmapped forward-over-reverse and double backward give the same matrix, and "auto" takes
    double backward on the CPU and says so (one probe at a time:
    test_fallback_paths_for_models_vmap_cannot_batch)."""
    model, batches = make_model("layernorm"), make_batches("layernorm", "bce")
    loss_fn = make_loss("bce")
    H_vmap = ck.hessian(model, loss_fn, batches, method="forward-over-reverse")
    d_vmap = H_vmap.dense()
    assert H_vmap.strategy == "vmap"
    H_auto = ck.hessian(model, loss_fn, batches)
    d_auto = H_auto.dense()
    assert H_auto.strategy == "double-backward" and H_auto.choice["chosen"] == "double-backward"
    H_db = HessianOperator(model, loss_fn, batches, method="double-backward")
    d_db = H_db.dense()
    assert H_db.strategy == "double-backward"
    ref = cached_ref("hessian", "layernorm-bce-mean")
    for d in (d_vmap, d_auto, d_db):
        assert_close(d, ref)
    with pytest.raises(ValueError, match="method must be"):
        ck.hessian(model, loss_fn, batches, method="newton")


class _TanhNoVmap(torch.autograd.Function):
    """tanh with forward- and reverse-mode rules but no vmap rule: vmap refuses it."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * (1 - torch.tanh(x) ** 2)


class _TanhOldStyle(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


def _mlp_with(fn):
    class Net(MLP):
        def forward(self, x):
            return self.fc2(fn.apply(self.fc1(x)))

    net = Net().double()
    net.load_state_dict(make_model("mlp").state_dict())  # the same function as the grid's MLP
    return net


def test_fallback_paths_for_models_vmap_cannot_batch():
    batches = make_batches("mlp", "ce")
    model = _mlp_with(_TanhNoVmap)
    H = ck.hessian(model, CE, batches, method="forward-over-reverse")
    assert_close(H.dense(), cached_ref("hessian", "mlp-ce-mean"))
    assert H.strategy == "loop"
    G = ck.ggn(model, CE, batches)
    assert_close(G.dense(), cached_ref("ggn", "mlp-ce-mean"))
    assert_close(ck.fisher(model, CE, batches).dense(), cached_ref("fisher", "mlp-ce-mean"))
    # no forward mode at all: the Hessian falls back to double backward
    old = _mlp_with(_TanhOldStyle)
    H = ck.hessian(old, CE, batches)
    assert_close(H.dense(), cached_ref("hessian", "mlp-ce-mean"))
    assert H.strategy == "double-backward"
    with pytest.raises(ModelError, match="use ck.hessian"):
        ck.ggn(old, CE, batches) @ randn(H.shape[0])


# ---------------------------------------------------------------------------------------------
# batching: the matrix of the mean (or sum) loss over all the data, however it is cut
def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossWarning)  # NLL: the GGN is zero and curvkit says so
        return fn(*args, **kw)


@pytest.mark.parametrize("case", params())
def test_rebatching_does_not_change_the_matrix(case):
    """One batch of 15 and uneven batches 7 + 5 + 3 give the same matrix: batches are weighted by
    their terms (for cross-entropy with ignore_index, the tokens that are not ignored)."""
    model, loss_fn = case.build(), case.loss()
    for make in (ck.hessian, ck.ggn, ck.fisher):
        one = _quiet(make, model, loss_fn, case.one_batch(), output=case.output).dense()
        uneven = _quiet(make, model, loss_fn, case.batches(), output=case.output).dense()
        assert_close(uneven, one)


# the cases where a piece's weight differs from its share of examples, and dict inputs to cut
CUT = ["convbn-ce-mean", "mlp-mse-sum", "mlp-ce-ignore-index", "mlp-ce-class-weights", "logsoftmax-nll-weights-sum",
       "token_mlp-ce-function-reshape", "attention-ce-spec-class-dim", "tied_lm-ce-smoothing-sum", "dict-bce-pos-weight"]


@pytest.mark.parametrize("case", params([BY_NAME[n] for n in CUT]))
def test_max_batch_gives_the_products_of_whole_batches(case):
    model, loss_fn, batches = case.build(), case.loss(), case.batches()
    n = sum(p.numel() for p in model.parameters())
    V = randn(n, 3, seed=5)
    for make in (ck.hessian, ck.ggn, ck.fisher):
        whole = _quiet(make, model, loss_fn, batches, output=case.output)
        cut = _quiet(make, model, loss_fn, batches, output=case.output, max_batch=2)
        assert_close(cut @ V, whole @ V)
    H = ck.hessian(model, loss_fn, batches, output=case.output, max_batch=2)
    assert H.loss_and_gradient()[0] == pytest.approx(ck.hessian(model, loss_fn, batches, output=case.output)
                                                     .loss_and_gradient()[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# params=
def _subset_index(model, names):
    idx, i = [], 0
    for n, p in model.named_parameters():
        if n in names:
            idx += range(i, i + p.numel())
        i += p.numel()
    return torch.tensor(idx)


@pytest.mark.parametrize(
    "spec, names",
    [
        (["fc.weight", "conv.bias"], {"fc.weight", "conv.bias"}),
        ("^bn\\.|fc.bias", {"bn.weight", "bn.bias", "fc.bias"}),
        (lambda n: n.endswith("weight"), {"conv.weight", "bn.weight", "fc.weight"}),
        ("module:conv", {"conv.weight", "conv.bias"}),
        ("tensors", {"bn.weight", "fc.weight"}),
    ],
    ids=["names", "regex", "predicate", "module", "tensors"],
)
@pytest.mark.parametrize("which", ["hessian", "ggn", "fisher"])
def test_params_subset_is_sub_block(spec, names, which):
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    if spec == "module:conv":
        spec = model.conv
    elif spec == "tensors":
        spec = [model.fc.weight, model.bn.weight]  # order given differs from the model's: model's wins
    A = getattr(ck, which)(model, CE, batches, params=spec)
    assert set(A.param_names) == names
    assert A.param_names == [n for n, _ in model.named_parameters() if n in names]  # the model's order
    idx = _subset_index(model, names)
    full = cached_ref(which, "convbn-ce-mean")
    assert_close(A.dense(), full[idx][:, idx])
    # and it is the matrix of the sub-vector (other parameters fixed): a direct reference too
    if which == "hessian":
        assert_close(A.dense(), ref_hessian(model, CE, batches, names=names))


def test_params_subset_with_frozen_parameters():
    """Parameters with requires_grad=False are excluded by default and held fixed."""
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    model.fc1.weight.requires_grad_(False)
    H = ck.hessian(model, CE, batches)
    assert "fc1.weight" not in H.param_names
    names = {"fc1.bias", "fc2.weight", "fc2.bias"}
    idx = _subset_index(model, names)
    assert_close(H.dense(), cached_ref("hessian", "mlp-ce-mean")[idx][:, idx])


def test_split_flatten_round_trip():
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    H = ck.hessian(model, CE, batches, params="conv|fc")
    v = randn(H.shape[0])
    parts = H.split(v)
    assert [p.shape for p in parts] == [p.shape for n, p in model.named_parameters() if n in H.param_names]
    assert torch.equal(H.flatten(parts), v)
    V = randn(H.shape[0], 3)
    blocks = H.split(V)
    assert [b.shape[-1] for b in blocks] == [3] * len(blocks)
    assert torch.equal(torch.cat([b.reshape(-1, 3) for b in blocks]), V)
    grads = [torch.ones_like(p) for n, p in model.named_parameters() if n in H.param_names]
    assert H.flatten(grads).shape == (H.shape[0],)
    with pytest.raises(ShapeError, match="expected 4 tensors"):
        H.flatten(grads[:-1])
    with pytest.raises(ShapeError, match="expected a vector of length"):
        H.split(v[:-1])


def test_blocks_are_diagonal_blocks():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    H = ck.hessian(model, CE, batches)
    full = cached_ref("hessian", "mlp-ce-mean")
    for by, keys in (("layer", ["fc1", "fc2"]), ("param", [n for n, _ in model.named_parameters()])):
        blocks = H.blocks(by)
        assert list(blocks) == keys
        for key, B in blocks.items():
            names = {n for n in H.param_names if (n.rpartition(".")[0] if by == "layer" else n) == key}
            idx = _subset_index(model, names)
            assert_close(B.dense(), full[idx][:, idx])


def test_parameters_of_the_root_module_form_one_layer():
    model = nn.Linear(3, 2).double()
    H = ck.hessian(model, CE, (torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))))
    assert list(H.blocks("layer")) == ["(root)"]
    assert_close(H.blocks("layer")["(root)"].dense(), H.dense())


def test_scaling_by_a_zero_dim_tensor():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    H = ck.hessian(model, CE, batches)
    v = torch.randn(H.shape[0], dtype=DT)
    assert_close((torch.tensor(0.5) * H) @ v, 0.5 * (H @ v))


def test_tied_weights_across_modules():
    """Two modules holding the same Parameter: one block, both uses differentiated."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(3, 3), nn.Linear(3, 3)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    model = Tied().double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in (6, 4)]
    H = ck.hessian(model, CE, batches)
    assert H.param_names == ["enc.weight", "enc.bias", "dec.bias"]
    assert_close(H.dense(), ref_hessian(model, CE, batches))
    assert_close(ck.ggn(model, CE, batches).dense(), ref_ggn(model, CE, batches))


# ---------------------------------------------------------------------------------------------
# composition and scipy
def test_composition():
    model, batches = make_model("mlp"), make_batches("mlp", "mse")
    loss_fn = make_loss("mse")
    H, G = ck.hessian(model, loss_fn, batches), ck.ggn(model, loss_fn, batches)
    Hd, Gd = cached_ref("hessian", "mlp-mse-mean"), cached_ref("ggn", "mlp-mse-mean")
    n = H.shape[0]
    eye = torch.eye(n, dtype=DT)
    assert_close((H + 0.3 * ck.identity_like(H)).dense(), Hd + 0.3 * eye)
    assert_close((2 * H).dense(), 2 * Hd)
    assert_close((H * 2).dense(), 2 * Hd)
    assert_close((H / 4).dense(), Hd / 4)
    assert_close((-H).dense(), -Hd)
    assert_close((H - G).dense(), Hd - Gd)
    assert_close((H @ G).dense(), Hd @ Gd)
    assert_close((0.5 * (H - G) @ (G + 1e-2 * ck.identity_like(G)) + H).dense(), 0.5 * (Hd - Gd) @ (Gd + 1e-2 * eye) + Hd)
    assert not (Hd - Gd).abs().max() < 1e-6  # H - G is not trivially zero here
    I = ck.identity_like(H)
    assert (I.shape, I.dtype, I.device) == (H.shape, H.dtype, H.device)
    with pytest.raises(ShapeError, match="cannot combine"):
        H + ck.hessian(model, loss_fn, batches, params="fc1")


def test_to_scipy():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    H = ck.hessian(model, CE, batches)
    S = H.to_scipy()
    n = H.shape[0]
    assert S.shape == (n, n) and S.dtype == np.float64
    v = randn(n, seed=3)
    Sv = S.matvec(v.numpy())
    assert isinstance(Sv, np.ndarray) and Sv.shape == (n,)
    assert_close(torch.from_numpy(Sv), H @ v)
    V = randn(n, 4, seed=4)
    SV = S.matmat(V.numpy())
    assert isinstance(SV, np.ndarray) and SV.shape == (n, 4)
    assert_close(torch.from_numpy(SV), H @ V)
    assert_close(torch.from_numpy(S @ v.numpy()), H @ v)
    # it works with scipy's own algorithms
    from scipy.sparse.linalg import eigsh

    top = eigsh(S, k=1, which="LA", return_eigenvectors=False)[0]
    assert abs(top - float(torch.linalg.eigvalsh(cached_ref("hessian", "mlp-ce-mean"))[-1])) < 1e-8


# ---------------------------------------------------------------------------------------------
# data
def test_dataloader_equals_list():
    batches = make_batches("mlp", "ce", sizes=(6, 6, 3))
    x, y = concat(batches)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)
    model = make_model("mlp")
    H_loader, H_list = ck.hessian(model, CE, loader), ck.hessian(model, CE, batches)
    assert H_loader.num_data == 15
    d = H_loader.dense()
    assert_close(d, H_list.dense(), tol=1e-14)
    assert_close(d, H_loader.dense(), tol=1e-14)  # re-iterated on every product
    assert_close(d, ref_hessian(model, CE, batches))
    assert_close(ck.ggn(model, CE, loader).dense(), ref_ggn(model, CE, batches))


def test_shuffled_dataloader_raises():
    x, y = concat(make_batches("mlp", "ce", sizes=(6, 6, 3)))
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    H = ck.hessian(make_model("mlp"), CE, loader)  # the construction scan is the first pass
    with pytest.raises(DataError, match="data changed between passes.*shuffle=False"):
        H @ randn(H.shape[0])


# ---------------------------------------------------------------------------------------------
# modes
def test_train_mode_batchnorm():
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    model.eval()  # the model's own mode is irrelevant and restored
    flags, bufs = training_flags(model), buffers_copy(model)
    H = ck.hessian(model, CE, batches, mode="train")
    d = H.dense()
    # batch statistics: the curvature is the batch-size-weighted sum of per-batch train-mode losses
    w = [len(y) / 15 for _, y in batches]
    assert_close(d, ref_hessian(model, CE, batches, train=True, per_batch_weights=w))
    assert (d - cached_ref("hessian", "convbn-ce-mean")).abs().max() > 1e-3  # differs from eval
    G = ck.ggn(model, CE, batches, mode="train")
    # the GGN in train mode: J^T H_loss J per batch, each batch with its own statistics
    ref_G = sum(wb * _train_ggn(model, b) for wb, b in zip(w, batches))
    assert_close(G.dense(), ref_G)
    assert training_flags(model) == flags and not model.training
    assert_buffers_equal(model, bufs)  # running statistics untouched


def _train_ggn(model, batch):
    from torch.autograd.functional import hessian as agh
    from torch.autograd.functional import jacobian as agj

    from cases import Flat

    f = Flat(model, train=True)
    x, y = batch
    out0 = f(f.theta0, x).detach()
    J = agj(lambda th: f(th, x).reshape(-1), f.theta0)
    Ho = agh(lambda o: CE(o.reshape(out0.shape), y), out0.reshape(-1))
    return J.T @ Ho @ J


class _DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def test_dropout():
    model = _DropNet().double()
    model.load_state_dict(make_model("mlp").state_dict())
    batches = make_batches("mlp", "ce")
    with pytest.raises(ModelError, match="dropout.*mode='eval'"):
        ck.hessian(model, CE, batches, mode="train")
    # eval mode (the default) switches dropout off even though the model is in train mode
    assert model.training
    assert_close(ck.hessian(model, CE, batches).dense(), cached_ref("hessian", "mlp-ce-mean"))
    assert model.training and model.drop.training
    with pytest.raises(ModelError, match="mode must be"):
        ck.hessian(model, CE, batches, mode="test")


def test_mixed_training_flags_restored():
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    model.bn.eval()  # a mix of train and eval submodules
    flags = training_flags(model)
    for mode in ("eval", "train"):
        A = ck.ggn(model, CE, batches, mode=mode)
        A @ randn(A.shape[0])
        assert training_flags(model) == flags
    # restored even when the product fails
    bad = [(x.clone(), y) for x, y in batches]
    bad[1][0][0, 0, 0, 0] = float("nan")
    H = ck.hessian(model, CE, bad)
    with pytest.raises(NonFiniteError):
        H @ randn(H.shape[0])
    assert training_flags(model) == flags


# ---------------------------------------------------------------------------------------------
# errors: each a curvkit error subclass whose message says what to do
def test_no_trainable_parameters():
    model = make_model("mlp").requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters.*params="):
        ck.hessian(model, CE, make_batches("mlp", "ce"))


def test_params_not_in_model():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    with pytest.raises(ModelError, match="no parameter named 'fc3.weight'; names are: fc1.weight"):
        ck.hessian(model, CE, batches, params=["fc3.weight"])
    with pytest.raises(ModelError, match="not a parameter of the model.*not copies"):
        ck.hessian(model, CE, batches, params=[model.fc1.weight.detach().clone()])
    with pytest.raises(ModelError, match="not a parameter of the model"):
        ck.ggn(model, CE, batches, params=[nn.Linear(2, 2).weight])
    with pytest.raises(ModelError, match="no parameter name matches"):
        ck.hessian(model, CE, batches, params="conv")
    with pytest.raises(ModelError, match="holds no parameter of the model"):
        ck.hessian(model, CE, batches, params=nn.Linear(4, 6))
    with pytest.raises(ModelError, match="selects no parameter"):
        ck.hessian(model, CE, batches, params=lambda n: False)
    with pytest.raises(ModelError, match="params= is empty"):
        ck.hessian(model, CE, batches, params=[])
    with pytest.raises(ModelError, match="torch.nn.Module"):
        ck.hessian(lambda x: x, CE, batches)


def test_bad_data():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    (x, y), z = batches[0], batches[0][1]
    with pytest.raises(DataError, match="data is empty"):
        ck.hessian(model, CE, [])
    with pytest.raises(DataError, match=r"\(inputs, targets\) pair.*DataLoader"):
        ck.hessian(model, CE, [(x, y, z)])
    with pytest.raises(DataError, match=r"\(inputs, targets\) pair"):
        ck.hessian(model, CE, (x, y, z))
    with pytest.raises(DataError, match=r"\(inputs, targets\) pair, got a dict; wrap your data"):
        ck.hessian(model, CE, {"x": x, "y": y})
    with pytest.raises(DataError, match=r"batch 0: a dict"):
        ck.hessian(model, CE, [{"x": x, "y": y}])
    with pytest.raises(DataError, match="batch 1: inputs have 5 examples but targets 4; the first dimension"):
        ck.hessian(model, CE, [batches[0], (batches[1][0], batches[1][1][:4])])
    with pytest.raises(DataError, match="one-shot iterator.*list of batches or a DataLoader"):
        ck.hessian(model, CE, (b for b in batches))
    with pytest.raises(DataError, match="batch 0 is empty"):
        ck.hessian(model, CE, [(x[:0], y[:0])])
    with pytest.raises(DataError, match="targets must be a tensor"):
        ck.hessian(model, CE, [(x, [0] * len(x))])
    with pytest.raises(DataError, match="iterable"):
        ck.hessian(model, CE, 3)


def test_non_scalar_loss():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    with pytest.raises(LossError, match="reduction='mean' or 'sum'"):
        ck.hessian(model, nn.CrossEntropyLoss(reduction="none"), batches)
    with pytest.raises(LossError, match=r"shape \(7,\).*reduction='mean' or 'sum'"):
        ck.hessian(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), batches)
    with pytest.raises(LossError, match="must return a scalar tensor"):
        ck.hessian(model, lambda o, t: 1.0, batches)
    with pytest.raises(LossError, match="must be callable"):
        ck.hessian(model, "ce", batches)


@pytest.mark.parametrize("make", [ck.hessian, ck.ggn, ck.fisher])
def test_non_finite_loss_names_the_batch(make):
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    bad0 = [(x.clone(), y) for x, y in batches]
    bad0[0][0][2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="batch 0.*NaN/inf"):  # checked at construction
        make(model, CE, bad0)
    bad2 = [(x.clone(), y) for x, y in batches]
    bad2[2][0][1, 0] = float("nan")
    A = make(model, CE, bad2)  # the first batch is fine
    with pytest.raises(NonFiniteError, match="loss is nan on batch 2;.*batch's inputs"):
        A @ randn(A.shape[0])
    # an inf input saturates tanh: the loss is finite but the derivatives are not
    inf2 = [(x.clone(), y) for x, y in batches]
    inf2[2][0][1, 0] = float("inf")
    A = make(model, CE, inf2)
    with pytest.raises(NonFiniteError, match="product is NaN or inf although every loss is finite"):
        A @ randn(A.shape[0])
    bad1 = [(x.clone(), y) for x, y in batches]
    bad1[1][0][0, 0] = float("nan")
    A = make(model, CE, bad1)
    with pytest.raises(NonFiniteError, match="loss is nan on batch 1;"):
        A @ randn(A.shape[0], 2)


def test_bad_vectors():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    H = ck.hessian(model, CE, batches)
    n = H.shape[0]
    with pytest.raises(ShapeError, match=rf"shape \({n},\) or a block \({n}, k\), got \({n + 1},\).*split / .flatten"):
        H @ randn(n + 1)
    with pytest.raises(ShapeError, match="got \\(3, 3, 3\\)"):
        H @ randn(3, 3, 3)
    with pytest.raises(ShapeError, match="dtype torch.float32 does not match.*v.to\\(torch.float64\\)"):
        H @ torch.zeros(n)
    with pytest.raises(ShapeError, match="on meta but the operator on cpu; use v.to\\('cpu'\\)"):
        H @ torch.zeros(n, dtype=DT, device="meta")
    with pytest.raises(ShapeError, match="to_scipy"):
        H @ np.zeros(n)
    v = randn(n)
    v[0] = float("nan")
    with pytest.raises(NonFiniteError, match="check the probes for NaN/inf"):
        H @ v


def test_dense_in_chunks():
    """dense() assembles blocks of `chunk` columns: any chunk size gives the same matrix."""
    model, batches = make_model("convbn"), make_batches("convbn", "ce")
    G = ck.ggn(model, CE, batches)
    ref = cached_ref("ggn", "convbn-ce-mean")
    for chunk in (1, 7, G.shape[0] - 1, 1000):
        assert_close(G.dense(chunk=chunk), ref)


def test_dense_too_large():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    H = ck.hessian(model, CE, batches)
    with pytest.raises(TooLargeError, match="exceeds max_size=10.*pass a larger max_size"):
        H.dense(max_size=10)
    assert H.dense(max_size=H.shape[0]).shape == H.shape


class _TupleNet(MLP):
    def forward(self, x):
        out = super().forward(x)
        return out, out.detach()


class _DictNet(MLP):
    def forward(self, x):
        return {"logits": super().forward(x)}


def test_ggn_needs_a_tensor_output():
    batches = make_batches("mlp", "ce")
    for cls, pick in ((_TupleNet, lambda o: o[0]), (_DictNet, lambda o: o["logits"])):
        model = cls().double()
        model.load_state_dict(make_model("mlp").state_dict())
        loss_fn = lambda o, t, pick=pick: CE(pick(o), t)  # noqa: E731  a loss that unpacks the output
        # the Hessian does not care what the model returns
        assert_close(ck.hessian(model, loss_fn, batches).dense(), cached_ref("hessian", "mlp-ce-mean"))
        for make in (ck.ggn, ck.fisher):
            with pytest.raises(LossError, match=f"returned {cls.__mro__[0] is _TupleNet and 'tuple' or 'dict'}.*single output tensor"):
                make(model, loss_fn, batches)
        # a plain loss on a tuple fails in the loss: reported as a LossError too, saying why
        with pytest.raises(LossError, match="loss_fn\\(model\\(inputs\\), targets\\) raised.*returned (tuple|dict)"):
            ck.hessian(model, CE, batches)


def test_model_failing_on_inputs():
    model = make_model("mlp")
    with pytest.raises(ModelError, match="the model raised RuntimeError on the inputs of batch 0"):
        ck.hessian(model, CE, [(torch.zeros(4, 5, dtype=DT), torch.zeros(4, dtype=torch.long))])


def test_mc_fisher_needs_a_likelihood():
    model, batches = make_model("mlp"), make_batches("mlp", "mse")
    huber = lambda o, t: nn.functional.huber_loss(o, t)  # noqa: E731
    with pytest.raises(LossError, match="CrossEntropyLoss, NLLLoss, MSELoss and BCEWithLogitsLoss; use kind='empirical'"):
        ck.fisher(model, huber, batches, kind="mc")
    # class weights scale each term's likelihood: the MC Fisher is still defined (E[F] = GGN, test_fisher)
    assert ck.fisher(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), make_batches("mlp", "ce"), kind="mc").shape[0] > 0
    assert ck.fisher(model, huber, batches).shape[0] > 0  # the empirical Fisher is fine
    with pytest.raises(ValueError, match="kind must be"):
        ck.fisher(model, huber, batches, kind="true")
    with pytest.raises(ValueError, match="mc_samples must be"):
        ck.fisher(model, nn.MSELoss(), batches, kind="mc", mc_samples=0)


def test_errors_are_curvkit_errors_and_builtin():
    for cls, builtin in (
        (ModelError, ValueError), (DataError, ValueError), (LossError, ValueError),
        (NonFiniteError, FloatingPointError), (ShapeError, ValueError), (TooLargeError, MemoryError),
    ):
        assert issubclass(cls, ck.CurvkitError) and issubclass(cls, builtin)


def test_ggn_fisher_reference_sanity():
    """The references themselves: on a linear model with MSE, H = GGN (the model is linear)."""
    model = nn.Linear(4, 3).double()
    batches = make_batches("mlp", "mse")
    assert_close(ref_hessian(model, nn.MSELoss(), batches), ref_ggn(model, nn.MSELoss(), batches))
    assert_close(ck.fisher(model, nn.MSELoss(), batches).dense(), ref_empirical_fisher(model, nn.MSELoss(), mse_terms, batches))


@pytest.mark.parametrize("loss_fn", [CE, nn.CrossEntropyLoss(ignore_index=1), nn.CrossEntropyLoss(reduction="sum")],
                         ids=["mean", "ignore-index", "sum"])
def test_loss_and_gradient_is_that_of_the_concatenated_data(loss_fn):
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    x, y = concat(batches)
    H = ck.hessian(model, loss_fn, batches)
    seen = []
    loss, grad = H.loss_and_gradient(on_batch=lambda out, t: seen.append(len(t)))
    model.eval()
    ref_loss = loss_fn(model(x), y)
    ref_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, list(model.parameters()))])
    assert loss == pytest.approx(float(ref_loss), rel=1e-12)
    assert_close(grad, ref_grad)
    assert seen == [len(t) for _, t in batches]


def test_loss_and_gradient_names_the_nan_batch():
    model, batches = make_model("mlp"), make_batches("mlp", "ce")
    batches[1][0][0, 0] = float("nan")  # construction checks batch 0 only
    H = ck.hessian(model, CE, batches)
    with pytest.raises(NonFiniteError, match="batch 1"):
        H.loss_and_gradient()
