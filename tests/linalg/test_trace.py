import pytest
import torch

from curvkit.errors import NonFiniteError, ShapeError
from curvkit.linalg import BlockResults, trace

from ._spectra import SPECTRA, spectrum, sym


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_within_four_stderr(name, method):
    A = sym(spectrum(name, n=200))
    exact = float(torch.trace(A))
    r = trace(A, method=method, probes=60, seed=3)
    assert r.matvecs == 60 and r.method == method and r.probes == 60
    assert r.stderr > 0
    assert abs(r.value - exact) < 4 * r.stderr


def test_stderr_is_calibrated():
    """Over many seeds the standardized errors have unit spread: stderr is neither inflated
    (which would make the 4-stderr test vacuous) nor too small."""
    A = sym(spectrum("indefinite", n=200))
    exact = float(torch.trace(A))
    for method in ("hutchinson", "hutch++"):
        z = torch.tensor([(r.value - exact) / r.stderr for r in (trace(A, method, 45, seed=s) for s in range(200))])
        assert 0.75 < float(z.pow(2).mean().sqrt()) < 1.3, method


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    A = sym(spectrum("lowrank", n=200))
    exact = float(torch.trace(A))
    err = {m: torch.tensor([trace(A, m, 30, seed=s).value - exact for s in range(40)]).pow(2).mean().sqrt()
           for m in ("hutchinson", "hutch++")}
    # root-mean-square error over 40 seeds at the same 30 products
    assert err["hutch++"] < 0.25 * err["hutchinson"], err


def test_same_seed_and_exact_when_sketch_spans():
    A = sym(spectrum("clustered", n=30))
    assert trace(A, seed=5) == trace(A, seed=5)
    r = trace(A, "hutch++", probes=99)  # sketch of 33 >= n = 30: the trace is exact
    assert r.stderr == 0 and r.value == pytest.approx(float(torch.trace(A)), abs=1e-10)


def test_bad_input():
    A = sym(spectrum("decaying", n=20))
    with pytest.raises(ValueError, match="method"):
        trace(A, method="hutch")
    with pytest.raises(ValueError, match="probes"):
        trace(A, probes=1)
    with pytest.raises(ShapeError, match="square"):
        trace(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="blocks"):
        trace(A, by="param")
    with pytest.raises(NonFiniteError):
        trace(A * float("nan"))


def test_tiny_network_hessian(tiny_hessian):
    H, D = tiny_hessian
    exact = float(torch.trace(D))
    r = trace(H, probes=90, seed=1)
    assert abs(r.value - exact) < 4 * r.stderr
    blocks = trace(H, "hutchinson", probes=40, seed=2, by="param")
    assert isinstance(blocks, BlockResults) and len(blocks) == 6
    start = 0
    for name, r in blocks.items():
        n = H.blocks("param")[name].shape[0]
        exact = float(torch.trace(D[start : start + n, start : start + n]))
        start += n
        assert abs(r.value - exact) < 4 * r.stderr + 1e-12, name
