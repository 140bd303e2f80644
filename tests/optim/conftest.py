import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated():
    """Seeding here must not shift the global RNG that later tests (the README's) draw from;
    one thread, since these problems are tiny and extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
