"""One size accounting for every compressed result: quantize, HAWQ plans and the report agree."""

import torch
from torch import nn

from curvkit import compress
from curvkit.compress.report import _pruned_size, parameter_bytes


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 3))


def test_quantize_size_equals_the_plan_of_the_same_uniform_width():
    # 3-bit codes of a 3x5 and a 3x3 weight (45 and 27 bits) plus their 16-bit scales are not whole bytes per
    # layer: both sizes must count the same bits
    net = _net()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    res = compress.quantize(net, x, bits=3)
    plan = compress.allocate_bits(net, nn.CrossEntropyLoss(), [(x, y)], bits=(3,), size_budget=1e9)
    q = compress.UniformQuantizer(3)
    exact = (q.storage_bits((3, 5)) + q.storage_bits((3, 3))) / 8 + 6 * 4  # + the float32 biases
    assert res.size == plan.size == exact
    assert res.original_size == parameter_bytes(net) == 30 * 4


def test_pruned_size_counts_kept_weights_and_one_mask_bit_per_weight():
    net = _net()
    res = compress.prune(net, data=torch.randn(32, 5), sparsity=0.5, method="magnitude")
    kept = sum(int(m.sum()) for m in res.masks.values())
    assert _pruned_size(res) == kept * 4 + (15 + 9) / 8 + 6 * 4

