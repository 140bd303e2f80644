"""Fixtures every test shares: one thread and an isolated global RNG.

The problems here are tiny: extra threads only add contention on a busy 2-core CI machine, so
the whole session runs on one (set before any module-scoped fixture builds its problem). Each
test runs inside ``torch.random.fork_rng``, so seeding in one test never shifts the random
stream a later test (the README's, say) draws from.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_rng():
    with torch.random.fork_rng():
        yield
