"""The documented examples run as written: every optimizer's and K-FAC's docstring."""

import doctest
import importlib
import sys

import pytest

MODULES = ["curvkit.optim.adahessian", "curvkit.optim.sophia", "curvkit.optim.kfac", "curvkit.optim.shampoo",
           "curvkit.optim.soap", "curvkit.optim.muon", "curvkit.approx.kfac"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    importlib.import_module(name)
    module = sys.modules[name]  # curvkit.approx.kfac the module, not the function re-exported under that name
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
