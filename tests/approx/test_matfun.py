"""Matrix functions against dense references (float64)."""

import pytest
import torch

from curvkit.approx.matfun import inverse_root, newton_schulz, sym_eigh
from curvkit.errors import ArgumentError, NonFiniteError


def _spd(n, cond, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    w = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=dtype)
    return (Q * w) @ Q.T


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_inverts_the_power(p, method):
    A, eps = _spd(12, 1e4), 1e-3
    X = inverse_root(A, p, eps=eps, method=method)
    B = A + eps * torch.eye(12, dtype=A.dtype)
    # X^(-p) = B, checked as X^p B = I
    R = torch.linalg.matrix_power(X, p) @ B
    assert torch.allclose(R, torch.eye(12, dtype=A.dtype), atol=1e-7)
    assert torch.allclose(X, X.T, atol=1e-9)


def test_newton_matches_eigh_and_batches():
    A = torch.stack([_spd(8, 100, seed=s) for s in range(3)])
    a = inverse_root(A, 4, eps=1e-6, method="eigh")
    b = inverse_root(A, 4, eps=1e-6, method="newton")
    assert a.shape == (3, 8, 8) and torch.allclose(a, b, atol=1e-8)


def test_low_precision_input_is_worked_in_float32():
    A = _spd(6, 10, dtype=torch.float32).to(torch.bfloat16)
    assert inverse_root(A, 2, eps=1e-3).dtype == torch.float32
    assert sym_eigh(A)[0].dtype == torch.float32


def test_eigh_clamps_round_off_negative_eigenvalues():
    v = torch.randn(10, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    A = v @ v.T - 1e-14 * torch.eye(10, dtype=torch.float64)  # rank one, slightly indefinite
    X = inverse_root(A, 2, eps=1e-4)
    assert torch.isfinite(X).all()


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (3, 10, 10)])
def test_newton_schulz_whitens_the_singular_values(shape):
    G = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == torch.float64
    s = torch.linalg.svdvals(X)
    # Muon's quintic pushes singular values into roughly [0.7, 1.2], not exactly to 1
    assert s.min() > 0.6 and s.max() < 1.25
    # and keeps the singular vectors: X = U f(S) V^T with the SVD's U, V
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.transpose(-1, -2) @ X @ Vh.transpose(-1, -2)
    off = D - torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-8


def test_bad_inputs_are_named():
    with pytest.raises(ArgumentError, match="square"):
        inverse_root(torch.zeros(3, 4), 2)
    with pytest.raises(ArgumentError, match="integer root"):
        inverse_root(torch.eye(3), 2.5, method="newton")
    with pytest.raises(ArgumentError, match="method"):
        inverse_root(torch.eye(3), 2, method="svd")
    with pytest.raises(NonFiniteError, match="NaN"):
        inverse_root(torch.full((3, 3), float("nan")), 2)


def test_newton_converges_on_a_rank_deficient_float32_factor():
    V = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    X = inverse_root(V @ V.T, 4, eps=1e-12, method="newton")  # round-off makes V V^T indefinite
    assert torch.isfinite(X).all()
