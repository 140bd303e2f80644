"""`curvkit influence`: the default end to end in a subprocess (--fast), bad input (exit code 2,
one line on stderr), and `influence_report` on a tiny float64 model against gradients taken by hand."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ArgumentError
from curvkit.influence.report import HOW_TO_READ, influence_report

from analyze._schema import png_size  # tests/ is on sys.path (rootdir-relative imports)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(curvkit.__file__).resolve().parents[1])  # the curvkit under test, not another install
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "curvkit", "influence", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("influence")
    return _run("--fast", "--quiet", "--out", str(out)), out


def test_default_end_to_end(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "influence.json").read_text())
    assert set(doc) >= {"schema", "settings", "description", "queries", "self_influence", "mislabels", "cost"}
    s = doc["settings"]
    assert s["method"] == "ekfac" and s["fast"] is True and s["k"] == 5
    assert len(doc["queries"]) == s["n_query"] > 0
    for q in doc["queries"]:
        assert set(q) >= {"index", "target", "helpful", "harmful"}
        assert len(q["helpful"]) == len(q["harmful"]) == s["k"]
        h, b = [e["score"] for e in q["helpful"]], [e["score"] for e in q["harmful"]]
        assert h == sorted(h, reverse=True) and b == sorted(b)
        assert all(0 <= e["index"] < s["n_train"] for e in q["helpful"] + q["harmful"])
    si = doc["self_influence"]
    assert len(si["values"]) == s["n_train"] and min(si["values"]) >= 0
    assert si["top"][0]["score"] == si["max"] == max(si["values"])
    m = doc["mislabels"]
    assert m["flipped"] == round(0.1 * s["n_train"]) == len(m["indices"])
    # the ranking finds the flipped labels far better than inspecting at random (10% / 20%)
    assert m["found_top_10pct"] > 0.3 and m["found_top_20pct"] > 0.5
    assert m["found_top_10pct"] <= m["found_top_20pct"] <= 1
    md = (out / "influence.md").read_text()
    for header in ("## How to read a score", "| inspected | flipped labels found |", "| rank | helpful: index |"):
        assert header in md
    for name in ("self_influence.png", "top_examples.png"):
        w, h = png_size(out / name)
        assert w >= 600 and h >= 300, (name, w, h)
        assert (out / name).stat().st_size > 10_000  # a drawn figure, not an empty canvas


def test_dtype_float64_scores_the_same_weights(default_run, tmp_path):
    # the same trained float32 weights scored in float64: the same ranking, scores to float32 accuracy
    proc = _run("--fast", "--quiet", "--dtype", "float64", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc64 = json.loads((tmp_path / "influence.json").read_text())
    doc32 = json.loads((default_run[1] / "influence.json").read_text())
    assert doc64["settings"]["dtype"] == "float64" and doc32["settings"]["dtype"] == "float32"
    assert doc64["settings"]["device"] == doc32["settings"]["device"] == "cpu"
    v64, v32 = torch.tensor(doc64["self_influence"]["values"]), torch.tensor(doc32["self_influence"]["values"])
    assert float((v64 - v32).norm() / v64.norm()) < 1e-3
    assert [e["index"] for e in doc64["self_influence"]["top"][:5]] == [e["index"] for e in doc32["self_influence"]["top"][:5]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_cuda_end_to_end(default_run, tmp_path):
    proc = _run("--fast", "--quiet", "--device", "cuda", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc, ref = (json.loads((d / "influence.json").read_text()) for d in (tmp_path, default_run[1]))
    assert doc["settings"]["device"] == "cuda"
    assert doc["mislabels"]["found_top_10pct"] == pytest.approx(ref["mislabels"]["found_top_10pct"], abs=0.05)


@pytest.mark.parametrize("args, says", [
    (["--damping", "-1"], "--damping"),
    (["--method", "lissa-ish"], "--method must be one of"),
    (["--data", "x:y"], "need --model"),
    (["--dtype", "float16"], "--dtype must be float32 or float64"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_one_line_exit_2(args, says, tmp_path):
    proc = _run(*args, "--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvkit: error:") and says in lines[0], proc.stderr
    assert not (tmp_path / "influence.json").exists()


def _grads(model, x, y):
    """Per-example loss gradients, one autograd call per example (the reference)."""
    rows = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_influence_report_matches_gradients_by_hand(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(24, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    xq, yq = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    train = [(x[:10], y[:10]), (x[10:], y[10:])]
    flipped = [2, 5, 11, 20]
    r = influence_report(model, nn.CrossEntropyLoss(), train, (xq, yq), method="identity", k=4, flipped=flipped)

    G, Gq = _grads(model, x, y), _grads(model, xq, yq)
    S = Gq @ G.T                               # Identity: plain gradient dot products
    selfs = (G * G).sum(1)
    for q, d in enumerate(r.queries):
        assert d["target"] == int(yq[q])
        assert [e["index"] for e in d["helpful"]] == S[q].argsort(descending=True)[:4].tolist()
        assert [e["index"] for e in d["harmful"]] == S[q].argsort()[:4].tolist()
        for e in d["helpful"] + d["harmful"]:
            assert e["score"] == pytest.approx(float(S[q, e["index"]]), rel=1e-10, abs=1e-12)
            assert e["label"] == int(y[e["index"]]) and e["flipped"] == (e["index"] in flipped)
    assert torch.allclose(torch.tensor(r.self_influence_values, dtype=torch.float64), selfs, rtol=1e-10)
    order = selfs.argsort(descending=True).tolist()
    assert r.mislabels["found_top_10pct"] == len(set(order[:3]) & set(flipped)) / 4   # ceil(2.4) = 3 inspected
    assert r.mislabels["found_top_20pct"] == len(set(order[:5]) & set(flipped)) / 4
    assert r.settings["damping"] == 0.0 and r.settings["n_train"] == 24

    doc = json.loads(json.dumps(r.to_dict()))  # plain JSON
    assert doc["self_influence"]["median"] == pytest.approx(float(selfs.median()))
    md = r.to_markdown()
    assert "## How to read a score" in md and HOW_TO_READ.splitlines()[0] in md
    names = {p.name for p in r.save(tmp_path)}
    assert names == {"influence.json", "influence.md", "self_influence.png", "top_examples.png"}


def test_influence_report_ekfac_and_non_image_data(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    r = influence_report(model, nn.CrossEntropyLoss(), (x, y), (x[:2], y[:2]), method="ekfac", damping=1e-2, k=3)
    from curvkit.influence import EKFAC

    ref = EKFAC(model, nn.CrossEntropyLoss(), (x, y), damping=1e-2).fit()
    S, selfs = ref.scores((x[:2], y[:2])), ref.self_influence()
    for q, d in enumerate(r.queries):
        assert [e["index"] for e in d["helpful"]] == S[q].argsort(descending=True)[:3].tolist()
    assert torch.allclose(torch.tensor(r.self_influence_values, dtype=torch.float64), selfs, rtol=1e-10)
    assert r.mislabels is None and r.settings["damping"] == 1e-2
    assert {p.name for p in r.save(tmp_path)} == {"influence.json", "influence.md", "self_influence.png"}
    with pytest.raises(ArgumentError, match="method must be one of"):
        influence_report(model, nn.CrossEntropyLoss(), (x, y), (x[:2], y[:2]), method="lissa")
    with pytest.raises(ArgumentError, match="k must be"):
        influence_report(model, nn.CrossEntropyLoss(), (x, y), (x[:2], y[:2]), k=31)
