"""The README's compression snippets run as written, in a temporary folder (they write files),
and give what their comments say."""

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet(heading: str) -> str:
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


@pytest.fixture
def scope(tmp_path):
    here = os.getcwd()
    os.chdir(tmp_path)
    yield {}
    os.chdir(here)


def test_hawq(scope):
    exec(compile(_snippet("### Mixed-precision bits (HAWQ)"), "README.md", "exec"), scope)
    plan, model = scope["plan"], scope["model"]
    assert plan.size <= 1200 and set(plan.bits.values()) <= {2, 4, 8}
    assert Path("pareto.png").is_file() and plan.measured_loss is not None
    assert not torch.equal(scope["quantized"][0].weight, model[0].weight)  # the copy, not the model


def test_pruning_and_gptq(scope):
    exec(compile(_snippet("### Pruning and quantization"), "README.md", "exec"), scope)
    assert scope["pruned"].sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(layer["damping"] > 0 for layer in scope["quant"].layers)
    from curvkit.compress import load_state_dict

    fresh = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fresh.load_state_dict(load_state_dict("model-4bit.safetensors"), strict=True)  # an ordinary state_dict


def test_structured(scope):
    exec(compile(_snippet("### Structured pruning"), "README.md", "exec"), scope)
    assert scope["res"].model[1].out_features == 16
    assert Path("pruned.pt").is_file() and Path("pruned.structure.json").is_file()


def test_mfac(scope):
    exec(compile(_snippet("### M-FAC"), "README.md", "exec"), scope)
    masks = scope["pruned"].masks
    assert sum(int((~m).sum()) for m in masks.values()) == 28  # half of the 56 weights, globally
