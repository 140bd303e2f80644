"""The README's monitoring snippet runs as written."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_monitoring_snippet_runs(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    text = README.read_text()
    section = text[text.index("## Monitoring curvature during training"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    mon = scope["mon"]
    assert [r.step for r in mon.history] == [0, 20, 40, 60, 80]
    assert mon.history[-1].thresholds["sharpness"] == 4.0
    assert (tmp_path / "curvature.jsonl").exists() and (tmp_path / "curvature.png").exists()
