"""ck.hessian equals the dense Hessian from torch.autograd.functional.hessian on every case."""

import pytest
import torch
from torch import nn

import curvkit as ck
from cases import DT, UNEVEN, assert_buffers_equal, assert_close, buffers_copy, cached_ref, params, training_flags


@pytest.mark.parametrize("case", params())
def test_hessian_equals_dense(case):
    model = case.build()
    flags, bufs = training_flags(model), buffers_copy(model)
    H = ck.hessian(model, case.loss(), case.batches(), output=case.output)
    assert H.shape == (sum(p.numel() for p in model.parameters()),) * 2 and H.dtype == DT
    assert H.num_data == sum(UNEVEN)
    assert_close(H.dense(), cached_ref("hessian", case.name))
    # the model ran in eval mode and came back exactly as it was (train mode, same buffers)
    assert training_flags(model) == flags and model.training
    assert_buffers_equal(model, bufs)


def test_mse_mean_hessian_takes_the_vmapped_path():
    """mse_loss(mean) has a forward-AD bug in torch; curvkit must not fall back to the slow path."""
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT))
    H = ck.hessian(model, nn.MSELoss(), data, method="forward-over-reverse")
    ref = ck.hessian(model, nn.MSELoss(), data, method="double-backward")
    assert_close(H.dense(), ref.dense())
    assert H.strategy == "vmap"


def test_double_backward_with_unused_and_linear_parameters():
    """Regression: double backward (the CPU default) refused a parameter the loss does not reach
    (an unused module) and one it reaches linearly; their rows of H are zero, as forward-over-reverse says."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.b = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(4, 2)
            self.shift = nn.Parameter(torch.zeros(2))  # enters the MSE loss linearly through the residual

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) + self.shift

    torch.manual_seed(0)
    model = Net().double()
    g = torch.Generator().manual_seed(1)
    for loss_fn, y in ((nn.CrossEntropyLoss(), torch.randint(0, 2, (5,), generator=g)),
                       (nn.L1Loss(), torch.randn(5, 2, generator=g, dtype=DT))):
        data = (torch.randn(5, 3, generator=g, dtype=DT), y)
        db = ck.hessian(model, loss_fn, data, method="double-backward").dense()
        fwd = ck.hessian(model, loss_fn, data, method="forward-over-reverse").dense()
        assert_close(db, fwd)
