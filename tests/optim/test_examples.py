"""The runnable optimizer examples train to a useful held-out accuracy on the digits."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["AdamW", "K-FAC", "Shampoo", "SOAP", "Muon"])
def test_kron_example_trains(name, capsys):
    mod = _load("optim_kron")
    assert mod.train(name, mod.OPTIMIZERS[name]) > 0.8  # 10 classes: chance is 0.1
    assert name in capsys.readouterr().out
