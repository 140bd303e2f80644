"""Gradient graphs kept between Hessian products (``HessianOperator.retaining``): the same
products, a forward saved per batch and product, and nothing reused that has changed."""

import contextlib

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ArgumentError, DataError
from curvkit.linear_operator import identity_like

from cases import DT, assert_close, make_batches, make_loss, make_model, randn

hess = __import__("sys").modules["curvkit.operators.hessian"]  # the module (ck.hessian is the function)


class Forwards:
    """Counts the model's forward calls (functional calls included)."""

    def __init__(self, model: nn.Module):
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))

    def since(self, start: int) -> int:
        return self.n - start


def _problem(kind="layernorm", loss="ce", sizes=(7, 5, 3)):
    model = make_model(kind)
    return model, make_batches(kind, loss, sizes), make_loss(loss)


def test_products_inside_retaining_equal_fresh_ones_and_run_one_forward_per_batch():
    model, batches, loss_fn = _problem()
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, batches)
    n = H.shape[0]
    v1, v2, V = randn(n), randn(n, seed=1), randn(n, 3, seed=2)
    ref = [H @ v1, H @ v2, H @ V]
    start = count.n
    with H.retaining():
        got = [H @ v1, H @ v2, H @ V, H @ v1]
        assert count.since(start) == len(batches)  # the first product's forwards only
        assert len(H._kept.graphs) == len(batches) and H._kept.held > 0
    for a, b in zip(got, ref + ref[:1]):
        assert torch.equal(a, b)  # the same operations on the same saved tensors
    assert H._kept is None
    start = count.n
    H @ v1
    assert count.since(start) == len(batches)  # outside: every product recomputes


def test_graphs_are_freed_on_exit_and_nested_contexts_share_them():
    model, batches, loss_fn = _problem()
    H = ck.hessian(model, loss_fn, batches)
    v = randn(H.shape[0])
    with H.retaining():
        H @ v
        kept = H._kept
        with H.retaining():  # an algorithm run inside a user's context: the same graphs
            assert H._kept is kept
            H @ v
        assert H._kept is kept and len(kept.graphs) == len(batches)
        grads = next(iter(kept.graphs.values())).grads
        assert grads[0].grad_fn is not None
    assert H._kept is None and not kept.graphs and kept.held == 0


def test_a_changed_parameter_is_recomputed_and_a_changed_batch_refused():
    model, batches, loss_fn = _problem()
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, batches)
    v = randn(H.shape[0])
    with H.retaining():
        H @ v
        with torch.no_grad():
            next(model.parameters()).add_(0.05)  # a training step inside the run
        start = count.n
        after = H @ v
        assert count.since(start) == len(batches)
        assert_close(after, ck.hessian(model, loss_fn, batches, retain_graphs=False) @ v)
        batches[1][0].mul_(1.5)  # a batch written in place: refused by the data loop, as without graphs
        with pytest.raises(DataError, match="data changed"):
            H @ v


def test_equal_batches_from_a_loader_are_reused():
    """A DataLoader yields new tensors every pass: the graphs are reused when their values match."""
    model, batches, loss_fn = _problem(sizes=(8, 8, 8))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, loader)
    v = randn(H.shape[0])
    with H.retaining():
        first = H @ v
        start = count.n
        assert torch.equal(H @ v, first)
        assert count.since(start) == 0


def test_micro_batches_are_kept_piece_by_piece():
    model, batches, loss_fn = _problem()
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, batches, max_batch=2)
    v = randn(H.shape[0])
    ref = ck.hessian(model, loss_fn, batches, retain_graphs=False) @ v
    pieces = sum(-(-int(y.shape[0]) // 2) for _, y in batches)
    with H.retaining():
        start = count.n
        H @ v
        assert count.since(start) == pieces
        start = count.n
        out = H @ v
        assert count.since(start) == 0 and len(H._kept.graphs) == pieces
    assert_close(out, ref)


def test_budget_limits_the_graphs_kept():
    model, batches, loss_fn = _problem(sizes=(6, 6, 6))
    v = randn(ck.hessian(model, loss_fn, batches).shape[0])
    H = ck.hessian(model, loss_fn, batches)
    with H.retaining():
        H @ v
        sizes = [g.nbytes for g in H._kept.graphs.values()]
    assert len(sizes) == 3 and min(sizes) > 0
    count = Forwards(model)
    for budget, kept in ((False, 0), (0, 0), (sizes[0], 1), (sizes[0] + sizes[1], 2)):
        H = ck.hessian(model, loss_fn, batches, retain_graphs=budget)
        with H.retaining():
            H @ v
            start = count.n
            H @ v
            assert count.since(start) == 3 - kept, budget
    with pytest.raises(ArgumentError, match="retain_graphs"):
        ck.hessian(model, loss_fn, batches, retain_graphs=-1)


def test_by_default_the_graphs_are_kept_all_or_none(monkeypatch):
    """retain_graphs=True keeps the graphs only if every batch's fits (judged from the first):
    a budget for two of three keeps none, where the same number of bytes given keeps two."""
    from curvkit.operators import _retain

    model, batches, loss_fn = _problem(sizes=(6, 6, 6))
    v = randn(ck.hessian(model, loss_fn, batches).shape[0])
    H = ck.hessian(model, loss_fn, batches, retain_graphs=2**40)
    with H.retaining():
        H @ v
        per = max(g.nbytes for g in H._kept.graphs.values())
    count = Forwards(model)
    for room, kept in ((3.5 * per, 3), (2.5 * per, 0)):
        monkeypatch.setattr(hess, "free_memory", lambda device, room=room: room / _retain.SHARE["cpu"])
        for budget, expect in ((True, kept), (int(room), int(room // per))):
            H = ck.hessian(model, loss_fn, batches, retain_graphs=budget)
            with H.retaining():
                H @ v
                start = count.n
                H @ v
                assert count.since(start) == 3 - expect, (room, budget)


def test_the_graph_memory_counted_is_what_autograd_saves():
    """The count is the saved tensors' storages plus the gradients, each storage once: for a linear
    model with MSE it is the batch's output error and the gradient (the input is the batch)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 3, dtype=DT)
    H = ck.hessian(model, nn.MSELoss(reduction="sum"), (x, y))
    with H.retaining():
        H @ randn(12)
        (g,) = H._kept.graphs.values()
    assert g.nbytes >= 12 * 8  # at least the gradient itself
    assert g.nbytes <= 12 * 8 + 4 * x.numel() * 8  # and nothing like a copy of the data per op


ALGORITHMS = {
    "eigenvalues": lambda A: ck.eigenvalues(A, k=2, tol=1e-8).values,
    "power_iteration": lambda A: ck.power_iteration(A, tol=1e-3, max_matvecs=40).values,
    "trace hutch++": lambda A: torch.tensor(ck.trace(A, probes=30).value),
    "diagonal": lambda A: ck.diagonal(A, probes=70).value,
    "spectral_density": lambda A: ck.spectral_density(A, iterations=6, probes=2).density,
    "solve": lambda A: ck.solve(A, randn(A.shape[0], 2), damping=5.0, tol=1e-8).x,
    "solve of a damped sum": lambda A: ck.solve(A + 0.5 * identity_like(A),
                                                randn(A.shape[0]), damping=5.0, tol=1e-8).x,
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_one_forward_per_batch_with_the_same_result(name):
    run = ALGORITHMS[name]
    model, batches, loss_fn = _problem()
    count = Forwards(model)
    lean = ck.hessian(model, loss_fn, batches, retain_graphs=False)
    start = count.n
    ref = run(lean)
    assert count.since(start) > len(batches)  # the algorithm makes several passes
    H = ck.hessian(model, loss_fn, batches)
    start = count.n
    out = run(H)
    assert count.since(start) == len(batches)
    assert torch.equal(out, ref)


def test_out_of_memory_with_graphs_kept_frees_them_and_recomputes(monkeypatch):
    """Kept graphs must never cost a product: out of memory, they go and the product is redone."""
    from curvkit.model.kernels import OutOfMemory

    model, batches, loss_fn = _problem()
    H = ck.hessian(model, loss_fn, batches)
    v = randn(H.shape[0])
    ref = H @ v
    real = torch.autograd.grad
    calls = {"n": 0}

    class Autograd:  # the module's torch, with grad failing once while graphs are kept
        def __getattr__(self, name):
            return getattr(torch.autograd, name)

        @staticmethod
        def grad(*a, **k):
            if H._kept is not None and H._kept.graphs and not k.get("create_graph") and calls["n"] == 0:
                calls["n"] += 1
                raise OutOfMemory("CUDA out of memory (simulated)")
            return real(*a, **k)

    class Torch:
        def __getattr__(self, name):
            return Autograd() if name == "autograd" else getattr(torch, name)

    with H.retaining():
        H @ v
        monkeypatch.setattr(hess, "torch", Torch())
        out = H @ v
        monkeypatch.undo()
        assert calls["n"] == 1 and H._kept.budget == 0 and not H._kept.graphs
    assert torch.equal(out, ref)


def test_kept_graphs_are_freed_on_exit_without_the_garbage_collector():
    """Nothing of a kept graph may wait for the cycle collector: an activation saved by the op that
    made it (tanh saves its output) dies when the context ends, with the collector off."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    seen = []
    model[1].register_forward_hook(lambda m, i, out: seen.append(weakref.ref(out)))
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = randn(H.shape[0])
    enabled = gc.isenabled()
    gc.disable()
    try:
        with H.retaining():
            H @ v
            H @ v
        assert seen and all(r() is None for r in seen)  # (the memory itself: test_cuda_graphs)
    finally:
        if enabled:
            gc.enable()


def test_dense_and_lissa_run_one_forward_per_batch():
    from curvkit.influence import LiSSA

    model, batches, loss_fn = _problem()
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, batches)
    start = count.n
    D = H.dense(chunk=8)  # several block products
    assert count.since(start) == len(batches)
    assert_close(D, ck.hessian(model, loss_fn, batches, retain_graphs=False).dense(chunk=8))
    est = LiSSA(model, loss_fn, batches, curvature="hessian", damping=5.0, depth=6, scale=50.0).fit()
    start = count.n
    est._precondition(randn(2, H.shape[0]))  # two query gradients, one per row
    assert count.since(start) == len(batches)

class _ScaledNet(nn.Module):
    """An MLP whose hidden layer is scaled by a buffer (a mask, a temperature): the forward reads it
    in either mode."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.scale)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_buffer_or_a_loss_weight_changed_in_place_is_recomputed(mode):
    """Every tensor the loss reads may change inside a run: a buffer in train mode too (the model's
    buffers are read, only BatchNorm's running statistics are not), and the loss's class weights."""
    torch.manual_seed(0)
    model = _ScaledNet().double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT))
    H = ck.hessian(model, loss_fn, (x, y), mode=mode)
    v = randn(H.shape[0])
    with H.retaining():
        H @ v
        model.scale.mul_(2.0)
        after_buffer = H @ v
        assert_close(after_buffer, ck.hessian(model, loss_fn, (x, y), mode=mode, retain_graphs=False) @ v)
        loss_fn.weight.mul_(torch.tensor([1.0, 5.0, 1.0], dtype=DT))
        after_weight = H @ v
        assert_close(after_weight, ck.hessian(model, loss_fn, (x, y), mode=mode, retain_graphs=False) @ v)


def test_a_batch_written_in_place_is_recomputed_even_where_the_data_loop_cannot_tell():
    """The data loop's checksum reads the first 16 features of each example; a graph kept for a
    batch must not outlive a write to the batch's tensors anywhere (their version counters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 20, dtype=DT), torch.randint(0, 3, (8,))
    H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = randn(H.shape[0])
    with H.retaining():
        H @ v
        x[:, 18] += 1.0
        after = H @ v
    assert_close(after, ck.hessian(model, nn.CrossEntropyLoss(), (x, y), retain_graphs=False) @ v)


class _WritesASavedTensor(nn.Module):
    """Writes in place to a tensor autograd saved (sigmoid's output): its backward is refused."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.sigmoid(self.fc1(x))
        out = self.fc2(h)
        h.mul_(2.0)
        return out


def test_a_model_that_writes_a_saved_tensor_is_refused_inside_retaining_as_outside():
    """Saved-tensor hooks turn off autograd's check of saved tensors' versions: the count keeps it,
    or an algorithm would return wrong numbers where a product raises."""
    torch.manual_seed(0)
    model = _WritesASavedTensor().double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        H @ randn(H.shape[0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ck.power_iteration(H, max_matvecs=5)


class _Masked(nn.Module):
    """Reads a plain tensor attribute (not a buffer), which the product saves (``h * mask``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.mask = torch.ones(6, dtype=DT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.mask)


def test_a_kept_graph_whose_saved_tensor_was_written_since_is_made_again():
    torch.manual_seed(0)
    model = _Masked().double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = randn(H.shape[0])
    with H.retaining():
        H @ v
        model.mask[:3] = 0.5
        after = H @ v
        assert len(H._kept.graphs) == 1  # made again, and kept
        assert torch.equal(H @ v, after)
    assert_close(after, ck.hessian(model, nn.CrossEntropyLoss(), (x, y), retain_graphs=False) @ v)


class _Noisy(nn.Module):
    """Draws from torch's random stream in its forward (noise injection, a reparameterised sample)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h * (1 + 0.5 * torch.randn_like(h)))


def test_a_forward_that_draws_random_numbers_is_not_kept():
    """Each product of such a model draws its own sample: a kept graph would freeze the first one
    (and leave the random stream where it was), so products inside differ from those outside."""
    torch.manual_seed(0)
    model = _Noisy().double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    H = ck.hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = randn(H.shape[0])
    torch.manual_seed(5)
    outside = [H @ v, H @ v]
    torch.manual_seed(5)
    with H.retaining():
        inside = [H @ v, H @ v]
        assert not H._kept.graphs
    for a, b in zip(inside, outside):
        assert torch.equal(a, b)


def test_out_of_memory_frees_the_graph_being_differentiated_before_the_product_is_redone(monkeypatch):
    """The graph whose re-differentiation ran out of memory is one of those freed: none may still be
    alive while the product is recomputed."""
    import gc
    import weakref

    from curvkit.model.kernels import OutOfMemory

    model, batches, loss_fn = _problem()
    H = ck.hessian(model, loss_fn, batches)
    v = randn(H.shape[0])
    ref = H @ v
    differentiate, gradient_graph = H._differentiate, H._gradient_graph
    alive, failed = [], []

    def failing(g, V, keep):
        if keep and not failed:
            failed.append(1)
            raise OutOfMemory("CUDA out of memory (simulated)")
        return differentiate(g, V, keep)

    def recompute(x, y, state, count):
        if not count:
            alive.append(sum(r() is not None for r in refs))
        return gradient_graph(x, y, state, count)

    enabled = gc.isenabled()
    gc.disable()
    try:
        with H.retaining():
            H @ v
            refs = [weakref.ref(g.grads[0]) for g in H._kept.graphs.values()]
            monkeypatch.setattr(H, "_differentiate", failing)
            monkeypatch.setattr(H, "_gradient_graph", recompute)
            out = H @ v
    finally:
        if enabled:
            gc.enable()
    assert failed and alive and max(alive) == 0, alive
    assert torch.equal(out, ref)


def test_a_batch_halved_out_of_memory_keeps_its_pieces_under_the_keys_of_later_passes(monkeypatch):
    """The data loop redoes a batch that ran out of memory in halves (and every later pass cuts it
    so): the failed call is no piece, or the halves are kept one key late, later passes recompute
    them and the last half's graph is held to the end unused."""
    import warnings

    from curvkit.model.kernels import OutOfMemory

    model, batches, loss_fn = _problem(sizes=(8, 8, 6))
    count = Forwards(model)
    H = ck.hessian(model, loss_fn, batches)
    v = randn(H.shape[0])
    ref = ck.hessian(model, loss_fn, batches, retain_graphs=False) @ v
    gradient_graph, failed = H._gradient_graph, []

    def once(x, y, state, count):
        if count and int(y.shape[0]) == 8 and not failed:
            failed.append(1)
            raise OutOfMemory("CUDA out of memory (simulated)")
        return gradient_graph(x, y, state, count)

    monkeypatch.setattr(H, "_gradient_graph", once)
    with H.retaining(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H @ v
        assert failed and H.risk.max_batch == 4
        start = count.n
        out = H @ v
        assert count.since(start) == 0
        assert len(H._kept.graphs) == 6  # 4 + 4 + 4 + 4 + 4 + 2 examples
    assert_close(out, ref)


def _fake_cuda(monkeypatch):
    """Enough of torch.cuda for method="auto"'s choice to run on the CPU: its timing and memory
    calls are no-ops (the operator's device is then set to "cuda" by hand)."""
    from types import SimpleNamespace

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SimpleNamespace(total_memory=2**40))


def test_auto_remembers_its_choice_for_later_operators_of_the_model(monkeypatch):
    """The measurement runs once per model, batch shape, probe count and context; a later
    operator takes the choice (and says so). CUDA faked on the CPU, as below."""
    _fake_cuda(monkeypatch)
    model, batches, loss_fn = _problem(sizes=(8, 8))
    measured = []
    real = hess.HessianOperator._measure_choice

    def counting(self, V, first):
        measured.append(V.shape[1])
        return real(self, V, first)

    monkeypatch.setattr(hess.HessianOperator, "_measure_choice", counting)

    def choose(data, k, retaining=False):
        H = ck.hessian(model, loss_fn, data, cuda_graphs=False, retain_graphs=2**30)  # (no free memory to ask)
        H.device = torch.device("cuda")
        with H.retaining() if retaining else contextlib.nullcontext():
            H._choose(randn(H.shape[0], k))
        return H

    first = choose(batches, 1)
    again = choose(batches, 1)
    assert measured == [1] and again.choice["cached"] and "cached" not in first.choice
    assert (again.strategy, again.choice["chosen"]) == (first.strategy, first.choice["chosen"])
    choose(batches, 3)  # another probe count
    choose(batches, 1, retaining=True)  # products that keep graphs cost otherwise
    choose(make_batches("layernorm", "ce", (4, 4)), 1)  # another batch shape
    assert measured == [1, 3, 1, 1]
    other = make_model("layernorm", seed=3)  # another model of the same shapes: its own measurement
    H = ck.hessian(other, loss_fn, batches, cuda_graphs=False)
    H.device = torch.device("cuda")
    H._choose(randn(H.shape[0], 1))
    assert measured == [1, 3, 1, 1, 1]


def test_auto_inside_retaining_survives_running_out_of_memory_while_timing_kept_graphs(monkeypatch):
    """method="auto" on CUDA times a kept graph on the slice (``_kept_seconds``) outside the data
    loop's out-of-memory handling: where the slice's graph does not fit (double backward itself had
    to halve it), the choice goes on as outside the context instead of failing the product. (CUDA
    faked on the CPU: the choice's timing calls are no-ops.)"""
    from curvkit.model.kernels import OutOfMemory

    _fake_cuda(monkeypatch)
    model, batches, loss_fn = _problem(sizes=(8, 8))
    H = ck.hessian(model, loss_fn, batches, cuda_graphs=False, retain_graphs=2**30)
    gradient_graph = H._gradient_graph

    def tight(x, y, state, count):
        if count and state is None:  # the kept graph timed on the slice
            raise OutOfMemory("CUDA out of memory (simulated)")
        return gradient_graph(x, y, state, count)

    monkeypatch.setattr(H, "_gradient_graph", tight)
    H.device = torch.device("cuda")  # _choose's test: the rest runs on the CPU
    V = randn(H.shape[0], 2)
    with H.retaining():
        H._choose(V)
    assert H.choice["chosen"] in ("double-backward", "forward-over-reverse")
    assert "seconds_kept" not in H.choice["double-backward"]


def test_the_host_budget_respects_a_container_memory_limit(monkeypatch, tmp_path):
    """In a container /proc/meminfo shows the host's memory: a quarter of it can pass the
    container's own limit (its cgroup), where running out kills the process."""
    from curvkit.operators import _retain

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{2**30}\n")
    usage.write_text(f"{3 * 2**28}\n")
    monkeypatch.setattr(_retain, "CGROUP_FILES", ((str(limit), str(usage)),))
    room = _retain.free_memory(torch.device("cpu"))
    assert room == 2**28  # the limit less what the container uses (the host has more available)
    model, batches, loss_fn = _problem()
    H = ck.hessian(model, loss_fn, batches)
    with H.retaining():
        assert H._kept.budget == _retain.SHARE["cpu"] * 2**28
    limit.write_text("max\n")  # no limit: the host's available memory
    unlimited = _retain.free_memory(torch.device("cpu"))
    monkeypatch.setattr(_retain, "CGROUP_FILES", ())
    assert unlimited == _retain.free_memory(torch.device("cpu")) > 2**28
