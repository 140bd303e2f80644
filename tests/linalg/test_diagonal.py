import pytest
import torch

from curvkit.errors import NonFiniteError, ShapeError
from curvkit.linalg import BlockResults, diagonal

from ._spectra import SPECTRA, spectrum, sym


@pytest.mark.parametrize("name", SPECTRA)
def test_within_four_stderr_and_calibrated(name):
    A = sym(spectrum(name, n=150))
    r = diagonal(A, probes=100, seed=2)
    assert r.matvecs == 100 and r.value.shape == (150,) and r.stderr.shape == (150,)
    z = (r.value - torch.diagonal(A)) / r.stderr
    assert (z.abs() < 4).all()
    # the stderr is the spread of the error, not an inflated bound
    assert 0.75 < float(z.pow(2).mean().sqrt()) < 1.3


def test_diagonal_matrix_is_exact_and_seeded():
    d = torch.linspace(-2, 3, 40, dtype=torch.float64)
    r = diagonal(torch.diag(d), probes=4)
    assert torch.allclose(r.value, d) and torch.all(r.stderr == 0)
    A = sym(spectrum("lowrank", n=40))
    assert torch.equal(diagonal(A, seed=9).value, diagonal(A, seed=9).value)


def test_bad_input():
    A = sym(spectrum("decaying", n=20))
    with pytest.raises(ValueError, match="probes"):
        diagonal(A, probes=1)
    with pytest.raises(ShapeError):
        diagonal(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(NonFiniteError):
        diagonal(A * float("inf"))


def test_tiny_network_hessian(tiny_hessian):
    H, D = tiny_hessian
    r = diagonal(H, probes=200, seed=0)
    z = (r.value - torch.diagonal(D)) / r.stderr.clamp_min(1e-300)
    exact_zero = r.stderr == 0  # e.g. rows of H that are zero except on the diagonal
    assert torch.allclose(r.value[exact_zero], torch.diagonal(D)[exact_zero], atol=1e-12)
    assert (z[~exact_zero].abs() < 4).all()
    blocks = diagonal(H, probes=50, by="layer")
    assert isinstance(blocks, BlockResults)
    assert sum(b.value.numel() for _, b in blocks.items()) == H.shape[0]
