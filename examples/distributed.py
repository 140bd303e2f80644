"""Curvature of one model over data sharded across processes, with torch.distributed.

    python -m torch.distributed.run --nproc-per-node 2 examples/distributed.py

Each process (rank) holds its own shard of scikit-learn's digits (batch i goes to rank
i % world, so the shards differ in size); every curvature product is summed over all the
ranks' data with one all-reduce, so every rank gets the Hessian of the mean loss over ALL the
data, and ``ck.eigenvalues`` / ``ck.trace`` with the same seed give the same numbers on every
rank. Rank 0 prints them and checks them against one process on all the data. CPU (gloo).
"""

import torch
import torch.distributed as dist
from torch import nn

import curvkit as ck
from curvkit import datasets

K, PROBES, BATCH = 5, 60, 128


def problem() -> tuple[nn.Module, list]:
    """The model (an MLP trained briefly from seed 0: the same on every rank) and ALL the
    batches of the digits (float64, so that the comparison with one process is tight)."""
    x, y = datasets.digits(torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # full-batch steps: deterministic, half a second
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, datasets.batches(x, y, BATCH)  # 15 batches, the last of 5 examples


def main() -> None:
    torch.set_num_threads(1)  # tiny products: more threads per process only contend
    dist.init_process_group("gloo")  # torch.distributed.run sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = problem()
    for p in model.parameters():  # every rank must analyse the same weights: rank 0's
        dist.broadcast(p.data, src=0)
    shard = batches[rank::world]  # this rank's data only

    loss_fn = nn.CrossEntropyLoss()
    H = ck.hessian(model, loss_fn, shard)  # distributed: on by default when a group is initialised
    top = ck.eigenvalues(H, k=K, seed=0)  # same seed on every rank (seed=None would be refused)
    tr = ck.trace(H, probes=PROBES, seed=0)

    if rank == 0:
        print(f"{world} ranks; rank 0 holds {H.num_data} of {sum(len(b[1]) for b in batches)} examples "
              f"({len(shard)} of {len(batches)} batches)")
        print("top eigenvalues: " + " ".join(f"{float(v):.10g}" for v in top.values))
        print(f"trace: {tr.value:.10g} ± {tr.stderr:.6g} ({tr.matvecs} products)")
        # the same computation in this process alone, on all the data
        H1 = ck.hessian(model, loss_fn, batches, distributed=False)
        top1, tr1 = ck.eigenvalues(H1, k=K, seed=0), ck.trace(H1, probes=PROBES, seed=0)
        diff = max(float(((top.values - top1.values) / top1.values).abs().max()),
                   abs(tr.value - tr1.value) / abs(tr1.value))
        verdict = "equal to one process on all the data" if diff < 1e-9 else "DIFFERENT from one process"
        print(f"{verdict}: largest relative difference {diff:.1e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
