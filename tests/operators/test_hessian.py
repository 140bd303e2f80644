"""ck.hessian equals the dense Hessian from torch.autograd.functional.hessian."""

import pytest
import torch
from torch import nn

import curvkit as ck

from .reference import DT, GRID, assert_buffers_equal, assert_close, buffers_copy, cached_ref, case, training_flags


@pytest.mark.parametrize("kind, loss, reduction, one_batch", GRID)
def test_hessian_equals_dense(kind, loss, reduction, one_batch):
    model, loss_fn, data = case(kind, loss, reduction, one_batch)
    flags, bufs = training_flags(model), buffers_copy(model)
    H = ck.hessian(model, loss_fn, data[0] if one_batch else data)
    assert H.shape == (sum(p.numel() for p in model.parameters()),) * 2 and H.dtype == DT
    assert H.num_data == 15
    assert_close(H.dense(), cached_ref("hessian", kind, loss, reduction))
    # the model ran in eval mode and came back exactly as it was (train mode, same buffers)
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)


def test_mse_mean_hessian_takes_the_vmapped_path():
    """mse_loss(mean) has a forward-AD bug in torch; curvkit must not fall back to the slow path."""
    model = nn.Linear(3, 2).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    H = ck.hessian(model, nn.MSELoss(), data, method="forward-over-reverse")
    ref = ck.hessian(model, nn.MSELoss(), data, method="double-backward")
    assert_close(H.dense(), ref.dense())
    assert H.strategy == "vmap"
