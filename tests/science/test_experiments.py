"""The science experiments: the smallest one end to end at a reduced size through the CLI (the
full set takes minutes: `curvkit experiment all`), and the CLI's bad input."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("typer")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_progressive_sharpening_quick_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "curvkit", "experiment", "progressive_sharpening", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr  # 1: a FAIL, which the JSON must then say
    r = json.loads((tmp_path / "progressive_sharpening.json").read_text())
    assert r["result"] == ("PASS" if proc.returncode == 0 else "FAIL")
    assert r["result"] in proc.stdout and "criterion" in r and r["setting"]["lr"] == 0.1
    m = r["measured"]
    # the sharpness measured by the monitor rises under small-step gradient descent, even in 200 steps
    assert m["final"] > m["initial"] and m["spearman"] > 0.5 and m["max_over_2_lr"] < 1
    assert (tmp_path / "progressive_sharpening.png").stat().st_size > 5000


def test_unknown_experiment_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "curvkit", "experiment", "edge_of_stabilty", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "edge_of_stability" in proc.stderr
