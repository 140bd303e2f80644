"""DensityResult.count_above: its standard error covers the actual error (the review found the
probe spread alone was 1.6x too small inside the bulk, with errors of 5 stderr)."""

import torch

import curvkit as ck


def test_count_above_is_within_four_stderr_of_the_exact_count_and_mostly_within_two():
    z = []
    for n in (300, 1000):
        g = torch.Generator().manual_seed(n)
        lam = torch.cat([torch.rand(n, generator=g) ** 2, torch.tensor([3.0, 5.0, 8.0])]).double()
        A = torch.diag(lam)
        for seed in range(5):
            d = ck.spectral_density(A, iterations=40, probes=8, seed=seed)
            for t in (0.1, 0.3, 0.5, 0.8, 2.0):
                z.append((d.count_above(t) - int((lam > t).sum())) / d.count_above_stderr(t))
    assert max(abs(v) for v in z) < 4
    assert sum(abs(v) > 2 for v in z) <= 0.1 * len(z)
