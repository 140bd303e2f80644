"""prune() chooses the layers of its copy by the caller's params=, whatever the pattern."""

import torch
from torch import nn

from curvkit import compress


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 3))


def test_structured_prune_takes_the_callers_tensors_in_params():
    # the copy that is pruned does not hold the caller's tensors: they are chosen by name
    net = _net()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = compress.prune(net, nn.CrossEntropyLoss(), [(x, y)], sparsity=0.34, method="magnitude", pattern="neuron",
                         params=[net[0].weight, net[0].bias])
    assert res.model[0].out_features < 3 and res.model[2].in_features == res.model[0].out_features
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
