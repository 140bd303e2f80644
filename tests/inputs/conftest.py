"""Shared references for the input-derivative tests: dense per-example Hessians by autograd."""

import torch


def hessians(f, x):
    """(B, d, d) per-example input Hessians of a scalar-per-example f, by torch.autograd.functional.hessian."""
    return torch.stack([
        torch.autograd.functional.hessian(lambda p: f(p.reshape(1, *x.shape[1:])).reshape(()), xi.reshape(-1))
        for xi in x
    ])


def laplacians(f, x):
    return hessians(f, x).diagonal(dim1=-2, dim2=-1).sum(-1)
