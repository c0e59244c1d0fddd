"""The chaos harness in the suite: a real mesh under faults for a while, with a fixed seed.

It runs the command line (tests/chaos/run.py) as a developer would, so what CI proves is what a
longer run by hand proves; see docs/ARCHITECTURE.md, "Chaos testing". On the embedded backend
the harness owns the server, so every fault kind runs; on the shared server (CONDUIT_TEST_DSN)
it works in a schema of its own and skips the faults that would stop or pause that server.
The liveness shapes, with their bounds, are in test_liveness_chaos.py. With --netns the mesh runs
on hosts in network namespaces (tests/netns) and partitions join the faults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from chaos.command import run_chaos
from chaos.faults import KINDS, PARTITIONS
from netns.hosts import unavailable

OWN_SERVER_ONLY = {"pg_restart", "pg_pause"}
NO_HOSTS = unavailable()
BACKENDS = [("embedded", 90)] + ([("server", 60)] if os.environ.get("CONDUIT_TEST_DSN") else [])


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("where", "seconds"), BACKENDS)
def test_chaos_loses_nothing_and_completes_nothing_twice(where: str, seconds: int, tmp_path: Path) -> None:
    # A generous drain: on a loaded CI machine the backlog left by the last faults takes a while;
    # waiting longer weakens nothing (a task that never ends is still lost).
    args = ["--duration", str(seconds), "--seed", "7", "--drain-timeout", "400"]
    args += ["--dsn", os.environ["CONDUIT_TEST_DSN"]] if where == "server" else []
    run = run_chaos(args, tmp_path / "chaos.json", timeout=840)
    summary, report = run.summary, run.report
    assert summary["seed"] == 7
    assert summary["lost"] == 0, report
    assert summary["double_completions"] == 0, report
    assert summary["submitted_acknowledged"] > 500, report  # there was load
    assert summary["completed"] + summary["dead"] == summary["submitted_acknowledged"], report
    # A run that injected nothing proves nothing: every kind of fault happened (on a shared
    # server, every kind that does not stop the server), and one that hit nothing is not counted.
    expected = set(KINDS) - (OWN_SERVER_ONLY if where == "server" else set())
    assert set(summary["faults_skipped"]) == set(KINDS) - expected, report
    assert all(summary["faults"].get(kind, 0) >= 1 for kind in expected), summary["faults"]
    assert all(f["detail"] != "0 backends" for f in summary["fault_log"]), summary["fault_log"]
    # Liveness is reported here, not bounded (database faults stall everything on purpose).
    assert summary["max_submit_latency_s"] is not None and summary["longest_start_gap_s"] > 0, report
    assert summary["violations"] == [] and summary["ok"], report
    assert run.returncode == 0, report


@pytest.mark.timeout(600)
# In CI (root, iproute2 installed by .ci/run) missing test hosts fail the test instead.
@pytest.mark.skipif(NO_HOSTS is not None and not os.environ.get("CI"), reason=f"no test hosts: {NO_HOSTS}")
def test_chaos_across_hosts_with_partitions_loses_nothing_and_never_stalls(tmp_path: Path) -> None:
    """--netns: brokers, workers and producers on hosts of their own, PostgreSQL through a proxy,
    and the network partitioned among the faults (seed 7 brings every kind of partition within
    60 s). While some broker can serve, task starts never stop for more than 3 s."""
    args = ["--netns", "--duration", "60", "--seed", "7", "--drain-timeout", "300"]
    run = run_chaos(args, tmp_path / "chaos.json", timeout=540)
    summary, report = run.summary, run.report
    assert set(summary["hosts"]) == {"b1", "b2", "b3", "w1", "w2", "c1"}, report
    assert summary["lost"] == 0 and summary["double_completions"] == 0, report
    assert summary["unexplained_re_executions"] == 0, report
    assert summary["completed"] + summary["dead"] == summary["submitted_acknowledged"] > 500, report
    assert all(summary["faults"].get(kind, 0) >= 1 for kind in PARTITIONS), summary["faults"]
    assert 0 < summary["longest_stall_served_s"] <= 3.0, report
    assert summary["violations"] == [] and summary["ok"] and run.returncode == 0, report
