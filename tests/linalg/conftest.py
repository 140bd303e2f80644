import pytest
import torch

from ._spectra import tiny_mlp_problem


@pytest.fixture(scope="session")
def tiny_hessian():
    """(H, H.dense()) for a tiny MLP: the operator under test and its exact matrix."""
    import curvkit.operators as ops

    model, loss, data = tiny_mlp_problem()
    H = ops.hessian(model, loss, data)
    return H, H.dense()


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are small: extra threads only add contention on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
