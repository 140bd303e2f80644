"""The `curvkit` command, run for real in subprocesses: the default end to end (--fast) and every
kind of bad input (exit code 2, one line on stderr, no traceback)."""

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from curvkit.analyze import schema

from analyze._schema import png_size, validate  # tests/ is on sys.path (rootdir-relative imports)

SCRIPT = Path(sys.executable).parent / "curvkit"


def _cmd() -> list[str]:
    if not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} missing: reinstall curvkit (pip install -e .) after pyproject changes")
    return [str(SCRIPT)]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run(_cmd() + ["analyze", "--fast", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    return proc, out


def test_default_end_to_end(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    assert f"report written to {out}" in proc.stdout
    doc = json.loads((out / "report.json").read_text())
    assert validate(doc, schema()) == []
    assert doc["settings"]["fast"] is True and doc["model"]["num_classes"] == 10
    md = (out / "report.md").read_text()
    for header in ("| # | Hessian λ |", "| layer | type |", "| setting | value |", "| quantity | operator products |"):
        assert header in md
    for name in ("spectrum.png", "layers.png"):
        w, h = png_size(out / name)
        assert 600 <= w <= 2000 and 250 <= h <= 1500, (name, w, h)
        assert (out / name).stat().st_size > 10_000  # a drawn figure, not an empty canvas


def test_default_layer_traces_sum_to_full_trace(default_run):
    _, out = default_run
    doc = json.loads((out / "report.json").read_text())
    layers, tr = doc["layers"], doc["trace"]
    combined = math.sqrt(sum(b["trace_stderr"] ** 2 for b in layers) + tr["stderr"] ** 2)
    assert abs(sum(b["trace"] for b in layers) - tr["value"]) < 4 * combined


def test_version_and_help():
    v = subprocess.run([sys.executable, "-m", "curvkit", "--version"], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("curvkit ")
    h = subprocess.run(_cmd() + ["analyze", "--help"], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "Examples:" in h.stdout and "--checkpoint" in h.stdout
    text = " ".join(h.stdout.split())  # the help is wrapped to the terminal
    # --threads says what to set for small models, in the CLI and in Python
    assert "Pass --threads 1 for small models; in Python, torch.set_num_threads(1)" in text, text
    assert "torchrun --nproc-per-node 2 -m curvkit analyze" in text


def test_torchrun_writes_one_report_on_rank_0(default_run, tmp_path):
    """2 processes of `curvkit analyze --fast` (gloo): each analyses its shard, rank 0 alone writes
    the report and prints the summary, and the top Hessian eigenvalue is the single process's."""
    _, single = default_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "curvkit", "analyze", "--fast", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("report written to") == 1, proc.stdout  # rank 0's summary only
    assert "2 processes (torch.distributed)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["layers.png", "report.json", "report.md", "spectrum.png"]
    doc = json.loads((out / "report.json").read_text())
    ref = json.loads((single / "report.json").read_text())
    assert validate(doc, schema()) == [] and doc["settings"]["world_size"] == 2
    (lam, res), (lam1, res1) = ((d["hessian"]["values"][0], d["hessian"]["residuals"][0]) for d in (doc, ref))
    # a Ritz value is within its residual norm of an eigenvalue: both of the same top one
    assert abs(lam - lam1) <= res + res1, (lam, res, lam1, res1)
    # the counts and the training accuracy are over every rank's shard, not rank 0's
    assert doc["data"]["ranks"] == 2 and ref["data"]["ranks"] == 1
    for key in ("examples", "batches", "heldout_examples"):
        assert doc["data"][key] == ref["data"][key], key
    assert doc["accuracy"]["data"] == pytest.approx(ref["accuracy"]["data"], abs=1e-12)
    assert doc["loss"]["data"] == pytest.approx(ref["loss"]["data"], rel=1e-5)


USER_MODULE = """
import argparse
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

def build_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]

def wrong_data():
    return "not a batch"
"""


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad input at once (started together: each pays the interpreter's start-up)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "user.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(d))
    try:
        import user  # noqa: F401  (the file the CLI will load, to write its checkpoints)

        model = user.build_model()
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("user", None)
    sd = model.state_dict()
    torch.save({**{k: v for k, v in sd.items() if k != "2.bias"}, "head.weight": torch.zeros(1)}, d / "keys.pt")
    torch.save({k: v.fill_(float("nan")) if k == "0.weight" else v for k, v in model.state_dict().items()}, d / "nan.pt")
    import argparse

    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, d / "pickle.pt")
    with open(d / "plain.pkl", "wb") as fh:  # pickle.dump, not torch.save: torch.load cannot read it at all
        pickle.dump({"state_dict": sd}, fh)
    (d / "file").write_text("")
    m, data = f"{d}/user.py:build_model", f"{d}/user.py:build_data"
    cases = {
        "import": (["--model", "no_such_module_xyz:build", "--data", data], "cannot import module 'no_such_module_xyz'"),
        "attribute": (["--model", f"{d}/user.py:nope", "--data", data], "has no attribute 'nope'"),
        "keys": (["--model", m, "--data", data, "--checkpoint", str(d / "keys.pt")],
                 "missing ['2.bias']; unexpected ['head.weight']"),
        "pickle": (["--model", m, "--data", data, "--checkpoint", str(d / "pickle.pt")], "--unsafe-pickle"),
        "plain_pickle": (["--model", m, "--data", data, "--checkpoint", str(d / "plain.pkl")],
                         "is a plain pickle file (written by pickle.dump), not a torch.save checkpoint"),
        "plain_pickle_unsafe": (["--model", m, "--data", data, "--checkpoint", str(d / "plain.pkl"), "--unsafe-pickle"],
                                "torch.save(model.state_dict(), 'model.pt')"),
        "data": (["--model", m, "--data", f"{d}/user.py:wrong_data"], "returned str"),
        "loss": (["--model", m, "--data", data, "--loss", "hinge"], "unknown loss"),
        "out": (["--model", m, "--data", data, "--out", str(d / "file" / "sub")], "cannot write there"),
        "nan": (["--model", m, "--data", data, "--checkpoint", str(d / "nan.pt")], "the loss is nan"),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = (["--model", m, "--data", data, "--device", "cuda"], "CUDA is not available")
    procs = {name: subprocess.Popen(_cmd() + ["analyze", "--quiet", "--out", str(d / name), *args],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=d)
             for name, (args, _) in cases.items()}
    debug = subprocess.Popen(_cmd() + ["analyze", "--debug", "--loss", "hinge"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=d)
    results = {name: (p.wait(timeout=300), *p.communicate(), cases[name][1]) for name, p in procs.items()}
    results["debug"] = (debug.wait(timeout=300), *debug.communicate(), None)
    return results


@pytest.mark.parametrize("case", ["import", "attribute", "keys", "pickle", "plain_pickle", "plain_pickle_unsafe",
                                  "data", "loss", "out", "nan", "cuda"])
def test_bad_input_is_one_line_exit_2(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("CUDA is available here")
    rc, out, err, phrase = bad_runs[case]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("curvkit: error: "), err
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(bad_runs):
    rc, _, err, _ = bad_runs["debug"]
    assert rc != 0 and "Traceback" in err and "unknown loss" in err


DICT_MODULE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, features, scale):
        return self.b(torch.tanh(self.a(features * scale)))

def build_model():
    torch.manual_seed(0)
    return Net()

def build_data():
    g = torch.Generator().manual_seed(0)
    return [({"features": torch.randn(16, 4, generator=g), "scale": torch.ones(16, 1)},
             torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
"""


def test_dict_input_batches(tmp_path):
    """Regression: a transformers-style batch (a dict of inputs, passed as keyword arguments) went
    through the Python API but the CLI's move to the device called .to on the dict."""
    (tmp_path / "dictnet.py").write_text(textwrap.dedent(DICT_MODULE))
    out = tmp_path / "report"
    proc = subprocess.run(_cmd() + ["analyze", "--model", f"{tmp_path}/dictnet.py:build_model", "--data",
                                    f"{tmp_path}/dictnet.py:build_data", "--fast", "--quiet", "--k", "3",
                                    "--dtype", "float64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["data"]["examples"] == 32 and doc["hessian"]["converged"]
