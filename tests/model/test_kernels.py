"""Fused kernels without second derivatives: curvature runs through them, on the differentiable
paths, with one warning naming the op; the numbers are the math path's (dense float64 references)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvkit as ck
from curvkit.errors import FallbackWarning
from curvkit.model.kernels import differentiable_kernels, fused_op

D = torch.float64


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 3, batch_first=True), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(7, 3, mode="mean"), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bag(x)))


def _problem(cls):
    torch.manual_seed(0)
    model = cls().to(D)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (5, 4), generator=g) if cls is Bag else torch.randn(5, 3, 4, generator=g, dtype=D)
    return model, x, torch.randint(0, 3, (5,), generator=g)


def _reference_hessian(model, x, y):
    """Double backward of the loss on the math / composite path (the functions' definition)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = t[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    model.eval()
    with differentiable_kernels():
        return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("cls", [Encoder, Attention, Recurrent, Bag])
def test_curvature_through_fused_kernels(cls):
    model, x, y = _problem(cls)
    ref = _reference_hessian(model, x, y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y), method="forward-over-reverse")
        got = H.dense()
        auto = ck.hessian(model, nn.CrossEntropyLoss(), (x, y)).dense()  # double backward on the CPU
        G = ck.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense()
    assert (got - ref).abs().max() < 1e-10 and (auto - ref).abs().max() < 1e-10
    assert H.strategy == "vmap"  # the transform path, on differentiable kernels
    assert torch.allclose(G, G.T, atol=1e-12) and torch.linalg.eigvalsh(G).min() > -1e-10
    named = [str(w.message) for w in seen if issubclass(w.category, FallbackWarning)]
    if cls is not Recurrent:  # on the CPU a float64 GRU takes the native cell already
        assert named and "has no second derivative" in named[0]


def test_embedding_bag_composite_equals_torch():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 4, generator=g, dtype=D)
    x2 = torch.randint(0, 9, (3, 5), generator=g)
    x1, offsets = torch.randint(0, 9, (8,), generator=g), torch.tensor([0, 2, 2, 5])
    psw = torch.rand(8, generator=g, dtype=D)
    for mode in ("sum", "mean", "max"):
        ref2 = F.embedding_bag(x2, W, mode=mode, padding_idx=3)
        ref1 = F.embedding_bag(x1, W, offsets, mode=mode)
        with differentiable_kernels():
            got2 = F.embedding_bag(x2, W, mode=mode, padding_idx=3)
            got1 = F.embedding_bag(x1, W, offsets, mode=mode)
        torch.testing.assert_close(got2, ref2)
        assert torch.allclose(got1[[0, 2, 3]], ref1[[0, 2, 3]])  # bag 1 is empty
    with differentiable_kernels():
        got = F.embedding_bag(x1, W, offsets, mode="sum", per_sample_weights=psw)
    torch.testing.assert_close(got, F.embedding_bag(x1, W, offsets, mode="sum", per_sample_weights=psw))


def test_context_restores_the_flags_and_errors_are_told_apart():
    fast, bag = torch.backends.mha.get_fastpath_enabled(), F.embedding_bag
    with differentiable_kernels():
        assert not torch.backends.mha.get_fastpath_enabled() and F.embedding_bag is not bag
    assert torch.backends.mha.get_fastpath_enabled() == fast and F.embedding_bag is bag
    assert fused_op(RuntimeError("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward "
                                 "is not implemented")) == "_scaled_dot_product_flash_attention_for_cpu_backward"
    assert fused_op(RuntimeError("Trying to use forward AD with mkldnn_rnn_layer that does not support it")) \
        == "mkldnn_rnn_layer"
    assert fused_op(RuntimeError("vmap: some other failure")) is None
    assert fused_op(ValueError("_embedding_bag")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_sdpa_kernels_on_cuda(dtype):
    """PyTorch's default attention on CUDA (flash / memory-efficient / cuDNN) has no double backward
    and no forward-mode AD: curvkit's products run through it (on the math backend) and equal a
    model written with explicit attention."""
    class SDPA(nn.Module):
        def __init__(self, math: bool):
            super().__init__()
            self.qkv, self.head, self.math = nn.Linear(16, 48), nn.Linear(16, 3), math

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
            if self.math:
                a = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            return self.head(a.transpose(1, 2).reshape(B, T, 16).mean(1))

    torch.manual_seed(0)
    fused, plain = SDPA(False).cuda().to(dtype), SDPA(True).cuda().to(dtype)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(8, 64, 16, device="cuda", dtype=dtype), torch.randint(0, 3, (8,), device="cuda")
    v = torch.randn(sum(p.numel() for p in fused.parameters()), device="cuda")
    for make in (ck.hessian, ck.ggn):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            a = make(fused, nn.CrossEntropyLoss(), (x, y)) @ v
        b = make(plain, nn.CrossEntropyLoss(), (x, y)) @ v
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert float((a - b).norm() / b.norm()) < tol, make.__name__
