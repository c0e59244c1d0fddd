"""The liveness shapes of the chaos harness (tests/chaos/scenarios.py): a broker paused for
8-15 s, each broker of three paused in turn, and a broker killed, on a warm mesh of three brokers
and three workers while producers submit at a steady pace. Each runs the command line with a
fixed seed and holds the product to what docs/PROTOCOL.md §11 promises: no wait on a broker much
beyond two liveness intervals. The clock starts once the mesh is warm, so process start-up is
not counted; every durability invariant is checked as in the random run."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos.command import run_chaos

SUBMIT_WITHIN = 3.0  # seconds: a keyed submit moves to another broker after ~2 s of silence
STARTS_EVERY = 3.0  # seconds: the longest the mesh may go without starting a task
BACK_AFTER_KILL = 2.0  # seconds from a broker's kill until every worker has new work
# Seconds from a broker's pause until each worker it served has new work: two liveness intervals
# to leave it, and two more in which the producers, waiting on the same broker, submit nothing.
BACK_AFTER_PAUSE = 4.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", ["broker_pause", "broker_pause_each", "broker_kill"])
def test_a_broker_paused_or_killed_stalls_nobody(scenario: str, tmp_path: Path) -> None:
    args = ["--scenario", scenario, "--seed", "7", "--drain-timeout", "120"]
    run = run_chaos(args, tmp_path / "chaos.json", timeout=240)
    s, report = run.summary, run.report
    assert s["scenario"] == scenario and s["seed"] == 7, report

    # The faults happened as the scenario says.
    faults = [(f["kind"], f["target"], float(f["detail"].split()[1].rstrip("s"))) for f in s["fault_log"]]
    if scenario == "broker_pause":
        assert [(k, 8.0 <= d <= 15.0) for k, _, d in faults] == [("broker_pause", True)], faults
    elif scenario == "broker_pause_each":
        assert [k for k, _, _ in faults] == ["broker_pause"] * 3, faults
        assert sorted(t for _, t, _ in faults) == ["b1", "b2", "b3"], faults
    else:
        assert [k for k, _, _ in faults] == ["broker_kill"], faults

    # There was load throughout, and none of it was lost or done twice.
    assert s["submitted_acknowledged"] > 200, report
    assert s["lost"] == 0 and s["double_completions"] == 0, report
    assert s["completed"] + s["dead"] == s["submitted_acknowledged"], report

    # Liveness: producers and workers moved to the brokers that were up.
    assert s["submit_errors"] == 0, report
    assert s["max_submit_latency_s"] <= SUBMIT_WITHIN, report
    assert s["longest_start_gap_s"] <= STARTS_EVERY, report
    # Workers moved too: "new work" is a task that a broker other than the one hit delivered.
    rows = s["back_to_work"]
    if scenario != "broker_pause_each":
        assert any(row["was_served_by_it"] for row in rows), report  # it hit a worker's broker
    for row in rows:
        if scenario == "broker_kill":
            assert row["seconds"] is not None and row["seconds"] <= BACK_AFTER_KILL, report
        elif row["was_served_by_it"]:
            assert row["seconds"] is not None and row["seconds"] <= BACK_AFTER_PAUSE, report

    assert s["violations"] == [] and s["ok"], report
    assert run.returncode == 0, report
