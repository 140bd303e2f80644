"""The data: one batch or an iterable of them, inputs a tensor or a nest of tensors, checked to be
the same on every pass."""

import pytest
import torch

import curvkit as ck
from curvkit.errors import DataError
from curvkit.model import Batches, split_batch
from cases import BY_NAME, assert_close, concat, randn


def test_one_batch_with_dict_inputs_is_one_batch():
    """Regression: ``(dict of inputs, targets)`` is a single batch (it was taken for a list of two
    batches and refused), for the operators and for per-example gradients."""
    case = BY_NAME["dict-bce-pos-weight"]
    model, loss_fn = case.build(), case.loss()
    batch = concat(case.batches())
    assert isinstance(batch[0], dict)
    assert Batches(batch).sizes == [15]
    H = ck.hessian(model, loss_fn, batch, output=case.output)
    assert_close(H.dense(), ck.hessian(model, loss_fn, [batch], output=case.output).dense())
    rows = ck.model.per_example_gradients(model, loss_fn, case.batches()[0], output=case.output)
    assert rows.shape[0] == 7
    # a list of two batches stays two batches
    assert Batches(case.batches()[:2]).sizes == [7, 5]
    assert Batches([(randn(3, 2), randn(3)), (randn(2, 2), randn(2))]).sizes == [3, 2]
    # tuple inputs: one batch too
    assert Batches(((randn(4, 2), randn(4, 3)), randn(4))).sizes == [4]


class _EmptyAfterFirst:
    """An iterable whose second pass yields nothing (an exhausted stream behind a re-iterable facade)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes == 1 else [])


def test_data_empty_on_its_second_pass_is_a_data_error():
    case = BY_NAME["mlp-ce-mean"]
    with pytest.raises(DataError, match="changed between passes"):
        ck.hessian(case.build(), case.loss(), _EmptyAfterFirst(case.batches()))


def test_split_batch_cuts_every_input_tensor():
    x = {"a": randn(5, 2), "b": (randn(5, 3), "keep")}
    pieces = split_batch(x, torch.arange(5), 2)
    assert [len(y) for _, y in pieces] == [2, 2, 1]
    assert pieces[2][0]["b"][1] == "keep" and pieces[1][0]["a"].shape == (2, 2)
    assert torch.equal(torch.cat([p[0]["b"][0] for p in pieces]), x["b"][0])


def test_to_scipy_of_a_bf16_operator_is_float32():
    """Regression: numpy has no bf16, and to_scipy() of a bf16 model's operator raised a raw TypeError."""
    import numpy as np

    import curvkit as ck

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    H = ck.hessian(model, torch.nn.CrossEntropyLoss(), (torch.randn(4, 3).to(torch.bfloat16), torch.randint(0, 2, (4,))))
    S = H.to_scipy()
    assert S.dtype == np.float32 and S.matvec(np.ones(8, dtype=np.float32)).shape == (8,)
