"""The chaos harness in the suite: a real mesh under faults for a while, with a fixed seed.

It runs the command line (tests/chaos/run.py) as a developer would, so what CI proves is what a
longer run by hand proves; see docs/ARCHITECTURE.md, "Chaos testing". On the embedded backend
the harness owns the server, so every fault kind runs; on the shared server (CONDUIT_TEST_DSN)
it works in a schema of its own and skips the faults that would stop or pause that server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chaos.faults import KINDS

RUN = Path(__file__).parent / "chaos" / "run.py"
OWN_SERVER_ONLY = {"pg_restart", "pg_pause"}
BACKENDS = [("embedded", 90)] + ([("server", 60)] if os.environ.get("CONDUIT_TEST_DSN") else [])


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("where", "seconds"), BACKENDS)
def test_chaos_loses_nothing_and_completes_nothing_twice(where: str, seconds: int, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    # A generous drain: on a loaded CI machine the backlog left by the last faults takes a while;
    # waiting longer weakens nothing (a task that never ends is still lost).
    cmd = [sys.executable, str(RUN), "--duration", str(seconds), "--seed", "7", "--json", str(out)]
    cmd += ["--drain-timeout", "400"] + (
        ["--dsn", os.environ["CONDUIT_TEST_DSN"]] if where == "server" else []
    )
    proc = _run(cmd, timeout=840)
    assert out.exists(), f"no summary (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(out.read_text())
    report = proc.stdout + proc.stderr[-3000:]
    assert summary["seed"] == 7
    assert summary["lost"] == 0, report
    assert summary["double_completions"] == 0, report
    assert summary["submitted_acknowledged"] > 500, report  # there was load
    assert summary["completed"] + summary["dead"] == summary["submitted_acknowledged"], report
    # A run that injected nothing proves nothing: every kind of fault happened (on a shared
    # server, every kind that does not stop the server).
    expected = set(KINDS) - (OWN_SERVER_ONLY if where == "server" else set())
    assert set(summary["faults_skipped"]) == set(KINDS) - expected, report
    assert all(summary["faults"].get(kind, 0) >= 1 for kind in expected), summary["faults"]
    assert summary["violations"] == [] and summary["ok"], report
    assert proc.returncode == 0, report


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the harness; if it overruns, SIGTERM lets it stop everything it started first."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
