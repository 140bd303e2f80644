"""The one layer registry: kinds by class or by what a module computes, the matrix view, ties."""

import pytest
import torch
from torch import nn

from curvkit.model import layers
from curvkit.model.layers import matrix_shape
from cases import DT, ConvBN, TiedLM, assert_close, params, randn


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: the weight stored (in, out), ``x W + b`` by addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MyLinear(nn.Module):
    """Not an nn.Linear, but computes x W^T + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Scale(nn.Module):
    """A 2-D weight that is not a linear map of the input rows."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return x * self.weight.sum(0)


def test_gpt2_conv1d_is_a_transposed_linear_layer():
    """Regression: a module storing its weight (in, out) and computing x W + b is "linear" with
    transposed=True; its matrix view is (out, in + 1) with W^T and the bias as the last column."""
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), MyLinear(5, 3), Scale()).to(DT)
    found = {layer.name: layer for layer in layers(model)}
    conv, mine, scale = found["0"], found["2"], found["3"]
    assert (conv.kind, conv.transposed, conv.shape) == ("linear", True, (5, 5))
    assert (mine.kind, mine.transposed, mine.shape) == ("linear", False, (3, 6))
    assert scale.kind == "other" and "Scale" in scale.kron_reason()
    assert conv.kron_reason() is None and conv.param_names == ["0.weight", "0.bias"]
    # the matrix view and back, with a leading batch of 2
    w, b = randn(2, 4, 5), randn(2, 5, seed=1)
    M = conv.to_matrix([w, b])
    assert M.shape == (2, 5, 5)
    assert_close(M[:, :, :4], w.transpose(1, 2))
    assert_close(M[:, :, 4], b)
    w2, b2 = conv.from_matrix(M)
    assert torch.equal(w2, w) and torch.equal(b2, b)


def test_kinds_by_class_and_the_chosen_columns():
    model = ConvBN().double()
    found = {layer.name: layer for layer in layers(model)}
    assert [(n, layer.kind) for n, layer in found.items()] == [("conv", "conv2d"), ("bn", "norm"), ("fc", "linear")]
    assert found["conv"].shape == (2, 10)  # (out, C*kh*kw + bias)
    assert found["bn"].kron_reason() == "module 'bn' is a BatchNorm2d"
    # only the bias of fc chosen: its column is the last of [W | b]
    (fc,) = layers(model, [("fc.bias", model.fc.bias)])
    assert fc.attrs == ["bias"] and fc.columns() == slice(8, 9)
    assert matrix_shape(torch.Size([4, 2, 3, 3])) == (4, 18) and matrix_shape(torch.Size([7])) is None


def test_a_tied_parameter_belongs_to_its_first_holder():
    model = TiedLM().double()
    found = {layer.name: layer for layer in layers(model)}
    assert list(found) == ["emb", "mid", "head"]
    assert found["emb"].kind == "embedding" and found["emb"].tied and found["head"].tied
    assert found["emb"].param_names == ["emb.weight"] and found["head"].param_names == ["head.bias"]
    assert "tied" in found["head"].kron_reason()
    assert not found["mid"].tied and found["mid"].kron_reason() is None


@pytest.mark.parametrize("case", params())
def test_every_parameter_is_in_exactly_one_layer_in_the_model_order(case):
    model = case.build()
    names = [n for layer in layers(model) for n in layer.param_names]
    assert names == [n for n, _ in model.named_parameters()]
