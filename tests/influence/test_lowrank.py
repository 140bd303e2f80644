"""Low-rank query gradients (``query_rank=``): exact at full rank, exact at the true rank of a
rank-1 query, and converging as the rank grows."""

import pytest
import torch
from torch import nn

from curvkit import influence
from curvkit.errors import ArgumentError

D = torch.float64


def _problem(seed=0):
    """Conv2d (16 positions per example: the path that forms per-example gradients) and two
    Linear layers (one row per example: the factored path), with a LayerNorm kept dense."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5), nn.LayerNorm(5),
                          nn.Linear(5, 3)).to(D)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(16, 1, 6, 6, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
    return model, [(x[:8], y[:8]), (x[8:], y[8:])], (x[:3] + 0.1, y[:3])


def _rel(A, B):
    return float((A - B).norm() / B.norm())


@pytest.mark.parametrize("make", [
    lambda m, d: influence.EKFAC(m, nn.CrossEntropyLoss(), d, damping=1e-2).fit(),
    lambda m, d: influence.TracIn(m, nn.CrossEntropyLoss(), d, [m.state_dict(), m.state_dict()], lr=[0.5, 1.0]).fit(),
], ids=["ekfac", "tracin"])
def test_full_rank_equals_exact_scores(make, tmp_path):
    model, data, query = _problem()
    inf = make(model, data)
    S = inf.scores(query)
    full = 48  # >= min(out, cols) of every layer
    assert _rel(inf.scores(query, query_rank=full), S) < 1e-10
    streamed = inf.scores(query, query_rank=full, out=tmp_path / "s.npy")
    assert _rel(torch.from_numpy(streamed.copy()), S) < 1e-10
    top = inf.top(query, k=3, query_rank=full)
    assert torch.equal(top.helpful, S.topk(3, dim=1).indices)


def test_rank_one_query_reproduced_at_rank_one():
    # one example through a linear layer: its gradient g a^T is rank 1, and Identity leaves it so
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(D)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 6, generator=g, dtype=D), torch.randint(0, 4, (10,), generator=g)
    inf = influence.Identity(model, nn.CrossEntropyLoss(), (x, y)).fit()
    query = (x[:4] * 0.5, y[:4])
    S = inf.scores(query)
    assert _rel(inf.scores(query, query_rank=1), S) < 1e-10


def test_error_shrinks_with_rank():
    model, data, query = _problem()
    inf = influence.EKFAC(model, nn.CrossEntropyLoss(), data, damping=1e-2).fit()
    S = inf.scores(query)
    errs = [_rel(inf.scores(query, query_rank=r), S) for r in (1, 2, 3, 5)]
    assert errs[0] > 1e-3  # rank 1 does lose something here
    assert all(b < a for a, b in zip(errs, errs[1:-1]))
    assert errs[-1] < 1e-10  # 5 = min(out, cols) of every layer: exact


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_query_rank(bad):
    model, data, query = _problem()
    inf = influence.Identity(model, nn.CrossEntropyLoss(), data).fit()
    with pytest.raises(ArgumentError, match="query_rank"):
        inf.scores(query, query_rank=bad)
    with pytest.raises(ArgumentError, match="query_rank"):
        inf.top(query, k=2, query_rank=bad)
