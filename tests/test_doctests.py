"""Every public operator and algorithm module documents itself with a runnable example.

pytest runs the examples themselves (``--doctest-modules`` over ``src/curvkit``, see
pyproject.toml); this test keeps them from disappearing.
"""

import doctest
import importlib
import sys

import pytest

DOCUMENTED = [
    "curvkit.operators.hessian", "curvkit.operators.ggn", "curvkit.operators.fisher", "curvkit.approx.kfac",
    "curvkit.linalg.lanczos", "curvkit.linalg.trace", "curvkit.linalg.diagonal", "curvkit.linalg.density",
    "curvkit.linalg.cg", "curvkit.linalg.power", "curvkit.model.per_example", "curvkit.linear_operator",
    "curvkit.optim.adahessian", "curvkit.optim.sophia", "curvkit.optim.kfac", "curvkit.optim.shampoo",
    "curvkit.optim.soap", "curvkit.optim.muon", "curvkit.optim.mfac", "curvkit.approx.mfac", "curvkit.compress.mfac",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_module_has_a_runnable_example(name):
    importlib.import_module(name)
    module = sys.modules[name]  # the module, not a function re-exported under the same name
    examples = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
    assert examples >= 3, f"{name} has {examples} doctest lines; add an Example: section to its docstring"

