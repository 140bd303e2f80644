"""The documented examples run as written."""

import doctest

import pytest

import curvkit.optim.adahessian
import curvkit.optim.sophia


@pytest.mark.parametrize("module", [curvkit.optim.adahessian, curvkit.optim.sophia])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
