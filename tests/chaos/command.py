"""Running the chaos command line from a test, as a developer would."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN = Path(__file__).resolve().parent / "run.py"


@dataclass(frozen=True)
class Outcome:
    returncode: int | None
    summary: dict[str, Any]
    report: str  # the table and the end of the progress log, for assertion messages


def run_chaos(args: list[str], summary: Path, timeout: float) -> Outcome:
    """Run tests/chaos/run.py with `args` plus `--json summary`; if it overruns, SIGTERM lets it
    stop everything it started first."""
    cmd = [sys.executable, str(RUN), *args, "--json", str(summary)]
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
    assert summary.exists(), f"no summary (exit {proc.returncode}):\n{err[-4000:]}"
    return Outcome(proc.returncode, json.loads(summary.read_text()), out + err[-3000:])
