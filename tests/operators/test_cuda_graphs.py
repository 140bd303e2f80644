"""CUDA-graph replay gives the eager products (GPU only; run on the GPU machine)."""

import pytest
import torch
from torch import nn

import curvkit as ck

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).cuda().eval()
    data = [(torch.randn(b, 1, 8, 8, device="cuda"), torch.randint(0, 3, (b,), device="cuda")) for b in (16, 16, 5)]
    return model, nn.CrossEntropyLoss(), data


@needs_cuda
@pytest.mark.parametrize("make", [ck.hessian, ck.ggn, ck.fisher])
@pytest.mark.parametrize("k", [1, 3])
def test_graph_replay_equals_eager(make, k):
    model, loss_fn, data = _setup()
    eager, graphed = make(model, loss_fn, data, cuda_graphs=False), make(model, loss_fn, data, cuda_graphs=True)
    for _ in range(3):  # eager run, capture, replay: new probes every time, read by the replay
        V = torch.randn(eager.shape[0], k, device="cuda")
        torch.testing.assert_close(graphed @ V, eager @ V, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_graph_follows_parameter_updates_and_reallocation():
    model, loss_fn, data = _setup()
    H = ck.hessian(model, loss_fn, data, cuda_graphs=True)
    V = torch.randn(H.shape[0], 2, device="cuda")
    for _ in range(3):
        H @ V
    with torch.no_grad():  # in-place update: the graph reads the new values
        for p in model.parameters():
            p.mul_(1.1)
    ref = ck.hessian(model, loss_fn, data, cuda_graphs=False)
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-5, atol=1e-6)



@needs_cuda
@pytest.mark.parametrize("k", [1, 3])
def test_auto_measures_both_methods_on_a_slice_and_gives_the_same_matrix(k):
    model, loss_fn, data = _setup()
    H = ck.hessian(model, loss_fn, data)  # method="auto"
    ref = ck.hessian(model, loss_fn, data, method="double-backward", cuda_graphs=False)
    V = torch.randn(H.shape[0], k, device="cuda")
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-5, atol=1e-6)
    c = H.choice
    assert c["chosen"] in ("double-backward", "forward-over-reverse")
    # measured on a slice of the first batch (16 examples: a quarter), not on the whole batch
    assert c["double-backward"]["examples"] == 4 and c["forward-over-reverse"]["examples"] == 4
    assert c["double-backward"]["peak_bytes"] > 0 and c["forward-over-reverse"]["seconds"] > 0


@needs_cuda
def test_lanczos_basis_in_host_memory_gives_the_device_result(monkeypatch):
    from curvkit.linalg import _basis

    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(3000, 400, device="cuda", dtype=torch.float64, generator=g)
    A = X.T @ X / 3000
    on_device = ck.eigenvalues(A, k=3, tol=1e-8, basis_size=12)  # restarts: the host path of restart too
    monkeypatch.setattr(_basis, "DEVICE_SHARE", 400 * 8 * 5 / torch.cuda.get_device_properties(0).total_memory)
    hybrid = ck.eigenvalues(A, k=3, tol=1e-8, basis_size=12)  # 5 vectors on the device, the rest pinned
    exact = torch.linalg.eigvalsh(A).flip(0)[:3]
    torch.testing.assert_close(on_device.values, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(hybrid.values, exact, rtol=1e-10, atol=0)
    assert hybrid.vectors.device.type == "cuda" and hybrid.converged


@needs_cuda
def test_kept_gradient_graphs_on_cuda_give_the_eager_products_and_count_their_memory():
    model, loss_fn, data = _setup()
    H = ck.hessian(model, loss_fn, data, method="double-backward", cuda_graphs=False)
    V = torch.randn(H.shape[0], 2, device="cuda")
    ref = H @ V
    torch.cuda.synchronize()
    with H.retaining():
        before = torch.cuda.memory_allocated()
        first = H @ V
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - first.numel() * first.element_size()
        counted = H._kept.held
        again = H @ V
    torch.testing.assert_close(first, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(again, ref, rtol=1e-6, atol=1e-7)
    assert len(data) == 3 and counted > 0
    assert 0.75 <= counted / held <= 1.25, (counted, held)  # the budget is spent on what is really held
    import gc

    gc.disable()  # freed at the exit, not whenever the cycle collector runs
    try:
        del first, again
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        with H.retaining():
            H @ V
            assert torch.cuda.memory_allocated() - start >= 0.75 * counted
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - start <= 0.05 * counted
    finally:
        gc.enable()


@needs_cuda
def test_auto_inside_retaining_weighs_what_later_products_cost():
    model, loss_fn, data = _setup()
    H = ck.hessian(model, loss_fn, data)
    V = torch.randn(H.shape[0], 1, device="cuda")
    ref = ck.hessian(model, loss_fn, data, method="double-backward", cuda_graphs=False) @ V
    with H.retaining():
        torch.testing.assert_close(H @ V, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(H @ V, ref, rtol=1e-5, atol=1e-6)
    assert H.choice["double-backward"]["seconds_kept"] > 0  # measured: what is compared is not asserted


@needs_cuda
def test_a_cuda_generator_seeds_draws_for_an_operator_elsewhere():
    """Probes drawn where the operator is, from a generator seeded by one draw of the one given: a
    CUDA generator for a CPU operator (its seed drawn on its own device), or one of another GPU."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = A @ A.T
    out = ck.trace(A, probes=12, seed=torch.Generator(device="cuda").manual_seed(3))
    assert out.matvecs == 12
    if torch.cuda.device_count() > 1:
        B = A.to("cuda:1")
        res = ck.eigenvalues(B, k=2, tol=1e-10, seed=torch.Generator(device="cuda:0").manual_seed(3))
        torch.testing.assert_close(res.values.cpu(), torch.linalg.eigvalsh(A)[-2:].flip(0), rtol=1e-8, atol=0)
