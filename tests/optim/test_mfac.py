"""The MFAC optimizer's step is exactly the windowed empirical Fisher's inverse times the
gradient (float64, dense reference), with momentum and decoupled weight decay on top."""

import torch
from torch import nn

from curvkit.optim import MFAC


def test_step_is_the_dense_windowed_fisher_inverse_times_the_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
               for _ in range(5)]
    lr, lam, m, mom, wd = 0.1, 0.05, 3, 0.5, 0.1
    opt = MFAC(model.parameters(), lr=lr, window=m, damping=lam, momentum=mom, weight_decay=wd)
    seen, buf = [], torch.zeros(8, dtype=torch.float64)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        seen.append(grad)
        W = torch.stack(seen[-m:])
        F = lam * torch.eye(8, dtype=torch.float64) + W.T @ W / W.shape[0]
        buf = mom * buf + torch.linalg.solve(F, grad)
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.allclose(after, before * (1 - lr * wd) - lr * buf, atol=1e-10, rtol=0)


def test_parameters_without_a_gradient_stand_still():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = MFAC(model.parameters(), lr=0.1, window=4)
    x = torch.randn(8, 3)
    frozen = model[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        model[0].weight.grad = None  # as if it were not used
        opt.step()
    assert torch.equal(frozen, model[0].weight)
