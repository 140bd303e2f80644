"""Curvature under torch.distributed: 2 and 3 CPU processes (gloo), each passing its own shard of
the data, get on every rank the products of ONE process on all the data (to 1e-12 relative),
with one all-reduce per product; ranks that disagree are refused on every rank, never left
waiting. And ``examples/distributed.py`` runs under ``torch.distributed.run``.

The data: five float64 batches of different sizes, cross-entropy with ``ignore_index`` so that
the ranks hold different numbers of loss terms; batch ``j`` goes to rank ``j % world``, so one
rank has a batch fewer than another (2 ranks: 3 and 2 batches; 3 ranks: 2, 2 and 1).

Each group is started ONCE (spawning costs seconds): every check runs inside it, its results
are saved to files and asserted here. A check that failed on a rank is saved as its traceback.
The group's timeout is short, so a deadlock shows as a failed check instead of a hung test.
"""

import os
import re
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvkit as ck

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build of PyTorch",
)

DT = torch.float64
SIZES = (7, 5, 6, 3, 4)
IGNORE = -100
REL = 1e-12
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# the problem (the same on every rank; only the data differs)
def make_model(extra: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)  # 67 parameters
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    if extra:  # a rank that built a different model: one more parameter
        model.register_parameter("extra", nn.Parameter(torch.zeros(1, dtype=DT)))
    return model


def all_batches() -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for j, b in enumerate(SIZES):
        x = torch.randn(b, 4, generator=gen, dtype=DT)
        y = torch.randint(0, 3, (b,), generator=gen)
        y[: j % 3] = IGNORE  # batches 1, 2, 4 and 5 lose 1 or 2 terms: the ranks' term counts differ
        out.append((x, y))
    return out


def shard(batches: list, rank: int, world: int) -> list:
    return batches[rank::world]


def loss_fn():
    return nn.CrossEntropyLoss(ignore_index=IGNORE)


def probes(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(2), dtype=DT)


OPERATORS = {
    "hessian": lambda m, d, **kw: ck.hessian(m, loss_fn(), d, **kw),
    "ggn": lambda m, d, **kw: ck.ggn(m, loss_fn(), d, **kw),
    "fisher_empirical": lambda m, d, **kw: ck.fisher(m, loss_fn(), d, kind="empirical", **kw),
    "fisher_mc": lambda m, d, **kw: ck.fisher(m, loss_fn(), d, kind="mc", mc_samples=2, seed=3, **kw),
}
KFAC_KINDS = ("type-2", "empirical", "mc")


def products(data, **kw) -> dict:
    """Every operator's product with the probes, K-FAC's factors, loss and gradient."""
    model = make_model()
    out = {}
    for name, make in OPERATORS.items():
        op = make(model, data, **kw)
        out[name] = op @ probes(op.shape[0])
    for kind in KFAC_KINDS:
        out[f"kfac_{kind}"] = ck.kfac(model, loss_fn(), data, kind=kind, seed=4, **kw).factors
    out["loss_and_gradient"] = ck.hessian(model, loss_fn(), data, **kw).loss_and_gradient()
    return out


def algorithms(data, **kw) -> dict:
    """What the linear algebra gives with the same seed: eigenvalues, trace, density, solve."""
    model = make_model()
    H = ck.hessian(model, loss_fn(), data, **kw)
    G = ck.ggn(model, loss_fn(), data, **kw)
    b = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(5), dtype=DT)
    eig = ck.eigenvalues(H, k=3, seed=0)
    tr = ck.trace(H, probes=30, seed=0)
    dens = ck.spectral_density(H, iterations=15, probes=2, grid=50, seed=0)
    sol = ck.solve(G, b, damping=1e-2)
    return {"eigenvalues": eig.values, "trace": torch.tensor([tr.value, tr.stderr]),
            "density": dens.density, "solve": sol.x, "solve_residual": torch.tensor([sol.residual]), "b": b}


def _refused(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return "nothing raised", ""


def refusals(rank: int, world: int) -> dict:
    """Ranks that disagree, one way each; every rank records what it raised."""
    data = shard(all_batches(), rank, world)
    H = ck.hessian(make_model(), loss_fn(), data)
    last = world - 1
    nan_first = [(x.clone(), y) for x, y in data]
    nan_later = [(x.clone(), y) for x, y in data]
    if rank == last:
        nan_first[0][0][-1, 0] = float("nan")  # met while the operator checks its first batch
    if rank == 0:
        nan_later[1][0][-1, 0] = float("nan")  # met in the middle of a product
    H_later = ck.hessian(make_model(), loss_fn(), nan_later)
    return {
        "parameter_count": _refused(lambda: ck.hessian(make_model(extra=rank == last), loss_fn(), data)),
        "chosen_params": _refused(lambda: ck.ggn(make_model(), loss_fn(), data,
                                                 params=(lambda n: n != "2.bias") if rank == 0 else None)),
        "seed_none": _refused(lambda: ck.trace(H, probes=12, seed=None)),
        "seed_per_rank": _refused(lambda: ck.eigenvalues(H, k=3, seed=rank)),
        "nan_first_batch": _refused(lambda: ck.hessian(make_model(), loss_fn(), nan_first)),
        "nan_later_batch": _refused(lambda: H_later @ probes(H.shape[0])),
        "empty_shard": _refused(lambda: ck.hessian(make_model(), loss_fn(), data if rank else [])),
        # fails on its first batch of a pass, before any sums exist: it still joins the all-reduce
        "error_first_product": _refused(lambda: ck.hessian(_FailsUnderGrad(rank == last), loss_fn(), data)
                                        @ probes(H.shape[0])),
        "error_first_gradient": _refused(lambda: ck.hessian(_FailsUnderGrad(rank == last), loss_fn(), data)
                                         .risk.loss_and_gradient()),
    }


class _FailsUnderGrad(nn.Module):
    """The test model, raising a plain RuntimeError on one rank once gradients are taken (the
    operator's first-batch check runs without them, so it passes there)."""

    def __init__(self, fail: bool):
        super().__init__()
        self.inner, self.fail = make_model(), fail

    def forward(self, x):
        if self.fail and torch.is_grad_enabled():
            raise RuntimeError("boom on this rank")
        return self.inner(x)


def _count_all_reduces(fn) -> int:
    real, calls = dist.all_reduce, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = real
    return len(calls)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    data = shard(all_batches(), rank, world)
    results = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception:
            results[name] = traceback.format_exc()

    try:
        run("products", lambda: products(data))
        run("local", lambda: products(data, distributed=False))
        run("algorithms", lambda: algorithms(data))
        H = ck.hessian(make_model(), loss_fn(), data)
        run("all_reduces", lambda: {"product": _count_all_reduces(lambda: H @ probes(H.shape[0])),
                                    "gradient": _count_all_reduces(H.loss_and_gradient)})
        run("loss_only", lambda: _loss_only(H))
        run("refusals", lambda: refusals(rank, world))
        run("after", lambda: H @ probes(H.shape[0]))  # the group is still in step after every refusal
        if rank:
            run("report_save", lambda: _save_on_rank(Path(out_dir) / f"report{rank}"))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _save_on_rank(folder: Path) -> tuple[list, bool]:
    """Report.save on a rank other than 0 (the real write is the CLI's torchrun test): what it
    returns and whether the folder exists afterwards. The sections need not be real: nothing is
    rendered there."""
    from dataclasses import fields

    from curvkit.analyze import Report

    report = Report(**{f.name: [] if f.name == "layers" else {} for f in fields(Report)
                       if f.name not in ("schema", "warnings")})
    return report.save(folder), folder.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def group(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    # spawn, not fork: a forked child of a process whose torch threads hold a lock can deadlock
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _loss_only(H) -> float:
    """A pass that sums nothing but its loss (what the monitor's probe loss does)."""
    risk = H.risk

    def batch(x, y, key):
        out = risk.function()(risk.space.detached(), x)
        return [], risk.loss(out, y).detach(), risk.weight(out, y)

    return float(risk.accumulate(batch, what="loss").loss)


def test_a_pass_of_the_loss_alone_is_the_loss_over_all_ranks(group):
    want = float(ck.hessian(make_model(), loss_fn(), all_batches()).risk.loss_and_gradient()[0])
    for rank, got in enumerate(_results(group, "loss_only")):
        assert abs(got - want) <= 1e-12 * abs(want), (rank, got, want)


def _results(group, key) -> list:
    world, ranks = group
    got = [r[key] for r in ranks]
    for rank, g in enumerate(got):
        assert not isinstance(g, str), f"rank {rank} of {world} failed:\n{g}"
    return got


def _flat(x) -> torch.Tensor:
    """Any nest of tensors, floats, tuples and dicts -> one flat float64 tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).to(DT)
    if isinstance(x, (int, float)):
        return torch.tensor([float(x)], dtype=DT)
    if isinstance(x, dict):
        return torch.cat([_flat(x[k]) for k in sorted(x)])
    return torch.cat([_flat(v) for v in x])


def _assert_rel(got, want, rel, what):
    g, w = _flat(got), _flat(want)
    err = float((g - w).norm() / w.norm())
    assert err <= rel, f"{what}: relative difference {err:.2e} > {rel:g}"


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process():
    return {"products": products(all_batches()), "algorithms": algorithms(all_batches())}


@pytest.mark.parametrize("what", [*OPERATORS, *(f"kfac_{k}" for k in KFAC_KINDS), "loss_and_gradient"])
def test_every_rank_gets_the_product_over_all_ranks_data(group, one_process, what):
    for rank, got in enumerate(_results(group, "products")):
        _assert_rel(got[what], one_process["products"][what], REL, f"{what} on rank {rank}")


def test_distributed_false_uses_the_local_shard_only(group):
    world, _ = group
    for rank, got in enumerate(_results(group, "local")):
        want = products(shard(all_batches(), rank, world))
        for what in want:
            _assert_rel(got[what], want[what], REL, f"{what} on rank {rank} with distributed=False")
        assert (got["hessian"] - _results(group, "products")[rank]["hessian"]).abs().max() > 1e-3  # not the same


@pytest.mark.parametrize("what", ["eigenvalues", "trace", "density", "solve"])
def test_algorithms_agree_on_every_rank_and_with_one_process(group, one_process, what):
    got = [r[what] for r in _results(group, "algorithms")]
    for rank, g in enumerate(got):
        assert torch.equal(g, got[0]), f"{what}: rank {rank} differs from rank 0"
    want = one_process["algorithms"]
    if what != "solve":  # Lanczos and Hutch++ amplify the products' round-off (1e-16) a little
        _assert_rel(got[0], want[what], 1e-10, what)
    else:  # CG stops at its tolerance, where round-off has moved its iterate: both solve the
        # system within their residuals r, so ||x - x1|| <= (r + r1) ||b|| / damping (G is PSD)
        res = float(_results(group, "algorithms")[0]["solve_residual"]) + float(want["solve_residual"])
        assert float((got[0] - want["solve"]).norm()) <= res * float(want["b"].norm()) / 1e-2


def test_one_all_reduce_per_product_and_per_gradient(group):
    for counts in _results(group, "all_reduces"):
        assert counts == {"product": 1, "gradient": 1}


REFUSED = {
    "parameter_count": ("ModelError", "disagree on the parameter count"),
    "chosen_params": ("ModelError", "disagree on the parameter count"),
    "seed_none": ("ArgumentError", "multiplied different vectors"),
    "seed_per_rank": ("ArgumentError", "multiplied different vectors"),
    "nan_first_batch": ("NonFiniteError", None),
    "nan_later_batch": ("NonFiniteError", None),
    "empty_shard": ("DataError", None),
}


@pytest.mark.parametrize("case", REFUSED)
def test_disagreeing_ranks_are_refused_on_every_rank(group, case):
    world, _ = group
    cls, phrase = REFUSED[case]
    got = [r[case] for r in _results(group, "refusals")]
    culprit = {"nan_first_batch": world - 1, "nan_later_batch": 0, "empty_shard": 0}.get(case)
    for rank, (name, msg) in enumerate(got):
        assert name == cls, f"rank {rank}: {name}: {msg}"
        if culprit is None:
            assert phrase in msg, msg
        elif rank == culprit:  # its own error, which says what is wrong
            assert {"NonFiniteError": "the loss is nan on batch", "DataError": "empty"}[cls] in msg, msg
        else:  # the others say which rank stopped and why they stop too
            assert f"rank {culprit} stopped with {cls}" in msg and "none waits" in msg, msg


@pytest.mark.parametrize("case", ["error_first_product", "error_first_gradient"])
def test_an_error_before_any_batch_is_done_stops_every_rank(group, case):
    """It used to stay on its rank while the others waited in the all-reduce for good."""
    world, _ = group
    for rank, (name, msg) in enumerate(r[case] for r in _results(group, "refusals")):
        if rank == world - 1:
            assert name == "RuntimeError" and "boom" in msg, msg
        else:
            assert name == "CurvkitError" and f"rank {world - 1} stopped with an error that is not curvkit's" in msg, msg


def test_the_group_is_still_in_step_after_every_refusal(group, one_process):
    for rank, got in enumerate(_results(group, "after")):
        _assert_rel(got, one_process["products"]["hessian"], REL, f"hessian on rank {rank} after the refusals")


def test_report_save_writes_nothing_on_other_ranks(group):
    world, ranks = group
    for rank in range(1, world):
        got = ranks[rank]["report_save"]
        assert not isinstance(got, str), got
        assert got == ([], False), f"rank {rank} wrote {got}"


# ---------------------------------------------------------------------------------------------
def test_example_runs_under_torchrun():
    """examples/distributed.py on 2 CPU processes prints rank 0's results, equal to one process's."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import distributed as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
        sys.modules.pop("distributed", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(ROOT / "examples" / "distributed.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("top eigenvalues") == 1, out  # printed by rank 0 only
    assert "2 ranks" in out and "equal to one process on all the data" in out, out
    printed = [float(v) for v in re.search(r"top eigenvalues: (.*)", out).group(1).split()]
    tr, se = (float(v) for v in re.search(r"trace: (\S+) ± (\S+)", out).groups())
    # an independent one-process run of the example's own problem (same model, data and seeds)
    model, data = example.problem()
    H = ck.hessian(model, nn.CrossEntropyLoss(), data)
    top = ck.eigenvalues(H, k=len(printed), seed=0)
    want = ck.trace(H, probes=example.PROBES, seed=0)
    for p, v in zip(printed, top.values.tolist()):
        assert abs(p - v) <= 1e-6 * abs(v), (printed, top.values)
    assert abs(tr - want.value) <= 1e-6 * abs(want.value) and abs(se - want.stderr) <= 1e-3 * want.stderr
