"""`curvkit compress`: the default (HAWQ on the digits CNN) end to end in a subprocess, one run per
method family on a user model (the written checkpoint loads into a fresh model and holds what
was asked), and bad input (exit code 2, one line on stderr)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.compress import apply_structure, load_state_dict

from analyze._schema import png_size  # tests/ is on sys.path (rootdir-relative imports)

USER = textwrap.dedent('''
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 16, generator=g)
        return [(x[i:i + 32], (x[i:i + 32, :4].sum(1) > 0).long() + 2 * (x[i:i + 32, 4] > 0).long())
                for i in range(0, 128, 32)]
''')


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(curvkit.__file__).resolve().parents[1])  # the curvkit under test, not another install
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "curvkit", "compress", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "net.py").write_text(USER)
    spec = str(d / "net.py")
    return d, ["--model", f"{spec}:model", "--data", f"{spec}:data", "--quiet"]


def _fresh(d: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_fresh", d / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.model(), mod.data()


def test_default_is_a_hawq_plan_within_the_uniform_4_bit_size(tmp_path):
    proc = _run("--fast", "--quiet", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "compress.json").read_text())
    plan = doc["result"]
    assert doc["kind"] == "bits" and doc["method"] == "hawq" and plan["choices"] == [2, 4, 8]
    uniform4 = plan["fixed_size"] + sum(row["choices"]["4"]["size"] for row in plan["layers"])
    assert plan["size"] <= uniform4 + 1e-9 and doc["size_after"] == plan["size"]
    assert doc["size_before"] > doc["size_after"] and plan["measured_loss"] == pytest.approx(doc["after"]["loss"])
    assert png_size(tmp_path / "pareto.png")[0] > 100
    assert "| layer | bits | mean trace | parameters |" in (tmp_path / "compress.md").read_text()


def test_obs_2_4_checkpoint_loads_and_holds_the_pattern(user, tmp_path):
    d, args = user
    proc = _run(*args, "--method", "obs", "--pattern", "2:4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    state = load_state_dict(tmp_path / "model.safetensors")
    model, _ = _fresh(d)
    model.load_state_dict(state, strict=True)
    for i in (0, 2, 4):
        w = model[i].weight.detach()
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2  # at most 2 of every 4 kept
    doc = json.loads((tmp_path / "compress.json").read_text())
    assert doc["kind"] == "prune" and doc["result"]["sparsity"] == pytest.approx(0.5)
    assert all(row["damping"] is not None for row in doc["result"]["layers"])


def test_oba_channel_writes_a_structure_that_rebuilds_the_smaller_model(user, tmp_path):
    d, args = user
    proc = _run(*args, "--method", "oba", "--pattern", "neuron", "--sparsity", "0.25", "--steps", "2",
                "--format", "pt", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    structure = json.loads((tmp_path / "model.structure.json").read_text())
    model, batches = _fresh(d)
    small = apply_structure(model, structure)
    small.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert small[0].out_features == 24 and small[2].out_features == 18  # a quarter of 32 and of 24 removed
    doc = json.loads((tmp_path / "compress.json").read_text())
    x, y = batches[0]
    assert torch.isfinite(small(x)).all() and doc["size_after"] < doc["size_before"]
    assert [len(row["removed_per_round"]) for row in doc["result"]["layers"]] == [2, 2]  # --steps 2 reached it


def test_gptq_weights_are_on_a_3_bit_grid_and_loss_is_measured(user, tmp_path):
    d, args = user
    proc = _run(*args, "--method", "gptq", "--bits", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    model, batches = _fresh(d)
    model.load_state_dict(load_state_dict(tmp_path / "model.safetensors"), strict=True)
    for i in (0, 2, 4):
        w = model[i].weight.detach()
        assert max(len(torch.unique(row)) for row in w) <= 8
    doc = json.loads((tmp_path / "compress.json").read_text())
    with torch.no_grad():
        loss = sum(float(torch.nn.functional.cross_entropy(model(x), y)) * len(y) for x, y in batches) / 128
    assert doc["after"]["loss"] == pytest.approx(loss, rel=1e-5)  # --heldout defaults to --data


@pytest.mark.parametrize("argv, message", [
    (["--method", "foo"], "--method must be one of"),
    (["--bits", "4,x"], "--bits must be integers"),
    (["--method", "gptq", "--bits", "3,4"], "takes one width"),
    (["--format", "zip"], "--format must be safetensors or pt"),
    (["--damping", "lots"], "--damping must be auto or a number"),
    (["--size-budget", "tiny"], "--size-budget 'tiny'"),
    (["--size-budget", "10"], "smallest"),
    (["--method", "obs", "--sparsity", "1.5"], "sparsity"),
    (["--method", "oba"], "structured"),
    (["--method", "obs", "--steps", "2"], "steps=2"),
    (["--method", "gptq", "--steps", "2"], "steps"),
    (["--method", "oba", "--pattern", "neuron", "--steps", "0"], "steps must be a positive int"),
    (["--heldout", "x.py:y"], "--heldout needs --model"),
])
def test_bad_input_is_one_line_and_exit_code_2(user, tmp_path, argv, message):
    from typer.testing import CliRunner

    from curvkit.cli import app

    args = user[1] if "--heldout" not in argv else ["--quiet"]  # a user model: no training before the error
    result = CliRunner().invoke(app, ["compress", *args, "--out", str(tmp_path), *argv])  # in process: fast
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvkit: error:") and message in lines[0], lines


def test_a_frozen_model_is_compressed_and_measured(tmp_path):
    """An inference model (requires_grad=False everywhere): the methods need no gradients and the
    before/after evaluation takes every parameter, so nothing refuses it."""
    from curvkit.compress.report import compress_report

    ns: dict = {}
    exec(USER, ns)
    model, batches = ns["model"]().requires_grad_(False), ns["data"]()
    rep = compress_report(model, torch.nn.CrossEntropyLoss(), batches, batches, method="gptq", bits=(3,),
                          progress=False)
    with torch.no_grad():
        loss = sum(float(torch.nn.functional.cross_entropy(model(x), y)) * len(y) for x, y in batches) / 128
    assert rep.before["loss"] == pytest.approx(loss, rel=1e-6) and rep.after["loss"] > 0
    assert rep.before["accuracy"] is not None and rep.size_after < rep.size_before
