"""Seeds: an int, a ``torch.Generator``, or ``None`` for fresh entropy (as numpy's
``default_rng(None)``). Same seed, same result; the generator lives on the CPU unless asked, so
the stream is the same on every rank. Large draws for an accelerator (the probes and start vectors
of :mod:`curvkit.linalg`) are made there, from a generator seeded by one draw of this stream: the
same on every rank, but other numbers than a CPU run draws with the same seed."""

from __future__ import annotations

import torch

from .errors import ArgumentError

Seed = "int | torch.Generator | None"


def generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator: ``seed`` itself if it is one, else a new one seeded by ``seed`` (``None``:
    fresh entropy, a different stream every call)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed_int(seed))
    return g


def seed_int(seed: int | torch.Generator | None) -> int:
    """An int seed: ``seed`` itself, one drawn from a generator, or from fresh entropy for ``None``."""
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device))
    if seed is None:
        return int(torch.Generator().seed() % 2**62)
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy as np

            if isinstance(seed, np.integer):
                return int(seed)
        except ImportError:  # pragma: no cover
            pass
        raise ArgumentError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    return int(seed)
