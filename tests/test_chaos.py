"""The chaos harness in the suite: about 90 s of faults on a real mesh, with a fixed seed.

It runs the command line (tests/chaos/run.py) as a developer would, so what CI proves is what a
longer run by hand proves; see docs/ARCHITECTURE.md, "Chaos testing"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from chaos.faults import KINDS

RUN = Path(__file__).parent / "chaos" / "run.py"


@pytest.mark.timeout(900)
def test_chaos_loses_nothing_and_completes_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    # A generous drain: on a loaded CI machine the backlog left by the last faults takes a while;
    # waiting longer weakens nothing (a task that never ends is still lost).
    cmd = [
        sys.executable,
        str(RUN),
        "--duration",
        "90",
        "--seed",
        "7",
        "--json",
        str(out),
        "--drain-timeout",
        "400",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840)
    assert out.exists(), f"no summary (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(out.read_text())
    report = proc.stdout + proc.stderr[-3000:]
    assert summary["seed"] == 7
    assert summary["lost"] == 0, report
    assert summary["double_completions"] == 0, report
    assert summary["submitted_acknowledged"] > 500, report  # there was load
    assert summary["completed"] + summary["dead"] == summary["submitted_acknowledged"], report
    # A run that injected nothing proves nothing: every kind of fault happened.
    assert summary["faults_skipped"] == {}, report
    assert all(summary["faults"].get(kind, 0) >= 1 for kind in KINDS), summary["faults"]
    assert summary["violations"] == [] and summary["ok"], report
    assert proc.returncode == 0, report
