"""EK-FAC under torch.distributed: 2 CPU processes (gloo), each holding its shard of the training
batches, fit the same K-FAC factors and eigenvalue corrections as one process on all of them
(the core's data loop all-reduces both), and score their own shard exactly as that one process
scores those training examples. The problem and the launcher are the model tests' own."""

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curvkit import influence
from tests.model.test_distributed import DT, SIZES, _flat, _free_port, all_batches, loss_fn, make_model, shard

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build of PyTorch",
)

WORLD = 2
KINDS = ("type-2", "mc")
REL = 1e-10


def query():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, 4, generator=gen, dtype=DT), torch.randint(0, 3, (4,), generator=gen)


def fitted(data, kind, distributed):
    inf = influence.EKFAC(make_model(), loss_fn(), data, damping=1e-2, kind=kind, seed=4, distributed=distributed)
    inf.fit()
    return {"factors": inf.kfac.factors, "eigenvalues": inf.eigenvalues, "scores": inf.scores(query()),
            "low_rank": inf.scores(query(), query_rank=2), "self": inf.self_influence()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for kind in KINDS:
            try:
                results[kind] = fitted(shard(all_batches(), rank, world), kind, True)
            except Exception:
                results[kind] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("infl_dist")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _columns(rank):
    """The single-process training indices of a rank's shard (batch j goes to rank j % world)."""
    starts = [sum(SIZES[:j]) for j in range(len(SIZES))]
    return torch.cat([torch.arange(starts[j], starts[j] + SIZES[j]) for j in range(rank, len(SIZES), WORLD)])


def _rel(got, want):
    g, w = _flat(got), _flat(want)
    return float((g - w).norm() / w.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_ekfac_equals_one_process_on_all_data(ranks, kind):
    want = fitted(all_batches(), kind, False)
    for rank, res in enumerate(ranks):
        got = res[kind]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert _rel(got["factors"], want["factors"]) < REL, ("factors", rank)
        assert _rel(got["eigenvalues"], want["eigenvalues"]) < REL, ("eigenvalues", rank)
        cols = _columns(rank)
        assert got["scores"].shape == (4, len(cols))
        assert _rel(got["scores"], want["scores"][:, cols]) < REL, ("scores", rank)
        assert _rel(got["low_rank"], want["low_rank"][:, cols]) < REL, ("low-rank scores", rank)
        assert _rel(got["self"], want["self"][cols]) < REL, ("self-influence", rank)
