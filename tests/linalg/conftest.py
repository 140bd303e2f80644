import pytest

from ._spectra import tiny_mlp_problem


@pytest.fixture(scope="session")
def tiny_hessian():
    """(H, H.dense()) for a tiny MLP: the operator under test and its exact matrix."""
    import curvkit.operators as ops

    model, loss, data = tiny_mlp_problem()
    H = ops.hessian(model, loss, data)
    return H, H.dense()
