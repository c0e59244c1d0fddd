#!/usr/bin/env python
"""Chaos run: a real mesh (brokers, workers, producers, PostgreSQL) under load while seeded faults
are injected; then the durability invariants are checked against the database and the ledger.

    python tests/chaos/run.py --duration 120 --seed 7 --json chaos.json
    python tests/chaos/run.py --scenario broker_pause --seed 3
    python tests/chaos/run.py --duration 900 --rate 2000    # 2,000 tasks/s offered in batches

Producers offer --rate tasks a second in submits of 1 to --batch tasks, as an open loop: batches
that a fault delayed go as soon as it ends. The task mix is made for the default 40/s; above it
submits grow rather than come more often, and handlers do the same work a second (each task
less), so a higher rate loads the brokers and the database, not the workers' sleeps.

A scenario is a fixed schedule (see tests/chaos/scenarios.py) whose liveness is bounded too:
submit latency, the longest gap in task starts, and how soon workers get new work after a fault.

Exit codes: 0 every invariant held, 1 a violation (listed), 2 the harness itself failed.
Progress goes to stderr, the summary table to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `chaos` is tests/chaos

from chaos.harness import STALL_LIMIT, Options, run
from chaos.load import BASE_RATE
from chaos.scenarios import SCENARIOS, run_scenario


def _seconds(value: float | None, at: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s (at t={at} s)"


def _table(s: dict[str, Any]) -> str:
    if s["scenario"] == "random":
        phase = [
            ("duration (fault phase)", f"{s['duration_s']:g} s, drained in {s['drain_s']} s"),
        ]
        faults = [
            ("faults injected", s["faults_total"]),
            *((f"  {k}", n) for k, n in s["faults"].items()),
            *((f"  {k}", f"skipped: {why}") for k, why in s["faults_skipped"].items()),
            *((f"  {k} that hit nothing (not counted)", n) for k, n in s["faults_missed"].items()),
        ]
        back: list[tuple[str, Any]] = []
    else:
        phase = [
            ("scenario", s["scenario"]),
            ("measured (warm mesh, under load)", f"{s['measured_s']} s, drained in {s['drain_s']} s"),
        ]
        faults = [
            (f"fault at t={f['at']} s", f"{f['kind']} {f['target']} {f['detail']}") for f in s["fault_log"]
        ]
        back = [
            (
                f"  {row['worker']} after {row['fault']}"
                + (" (its broker)" if row["was_served_by_it"] else ""),
                ("never" if row["seconds"] is None else f"{row['seconds']:.2f} s")
                + (f" after {row['busy_s']:.2f} s with old work" if row["busy_s"] else ""),
            )
            for row in s["back_to_work"]
        ]
        if back:
            back.insert(0, ("new work after the fault", ""))
    rows = [
        ("seed", s["seed"]),
        ("backend", s["backend"]),
        *([("hosts", ", ".join(f"{k} {v}" for k, v in s["hosts"].items()))] if s["hosts"] else []),
        *phase,
        ("offered (target)", f"{s['rate_target']:g} tasks/s, submits of 1 to {s['batch_max']}"),
        (
            "achieved (tasks/s)",
            f"offered {s['offered_per_s']:g}, acknowledged {s['acknowledged_per_s']:g}, "
            f"handler runs ended {s['ran_per_s']:g}",
        ),
        ("submits acknowledged", s["submitted_acknowledged"]),
        (
            "tasks not acknowledged",
            f"{s['submit_unacknowledged']} (submits raised {s['submit_errors']} times)",
        ),
        ("  of which committed anyway", s["submit_unacknowledged_but_committed"]),
        ("completed", s["completed"]),
        ("dead (failed on purpose)", s["dead"]),
        ("executions", s["executions"]),
        ("re-executions", s["re_executions"]),
        *((f"  after {k}", n) for k, n in sorted(s["re_executions_by_cause"].items())),
        ("  unexplained", s["unexplained_re_executions"]),
        *faults,
        ("slowest submit", _seconds(s["max_submit_latency_s"], s["max_submit_latency_at"])),
        (
            "submits over 1 s",
            ", ".join(f"{b['producer']} {b['seconds']:.2f} s at t={b['at']:.1f}" for b in s["slow_submits"])
            or "none",
        ),
        ("longest gap in task starts", _seconds(s["longest_start_gap_s"], s["longest_start_gap_at"])),
        (
            "  while a broker could serve",
            _seconds(s["longest_stall_served_s"], s["longest_stall_served_at"])
            + (f" (bound {STALL_LIMIT:g} s)" if s["hosts"] else ""),
        ),
        *back,
        ("broker RSS max (MB)", ", ".join(f"{k} {v}" for k, v in s["broker_rss_max_mb"].items())),
        ("ran before run_at", s["ran_before_run_at"]),
        ("results not from the lease holder", s["wrong_results"]),
        ("processes that crashed on their own", s["unexpected_exits"]),
        ("LOST", s["lost"]),
        ("DOUBLE COMPLETIONS", s["double_completions"]),
        ("verdict", "ok" if s["ok"] else f"{s['violation_count']} VIOLATIONS"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of random faults under load (default 120)"
    )
    parser.add_argument(
        "--scenario",
        choices=["random", *SCENARIOS],
        default="random",
        help="a fixed liveness schedule instead of random faults (--duration does not apply)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seeds the fault schedule and the load (default 1)"
    )
    parser.add_argument("--json", type=Path, help="write the summary to this file as one JSON object")
    parser.add_argument(
        "--dsn",
        help="PostgreSQL to use (a schema of the run's own; no restarts); default: a private embedded one",
    )
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, help="worker processes (default 3; 4 with --netns: 2 on each worker host)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=BASE_RATE,
        help="tasks offered a second, over all producers (default 40)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="the largest submit: each takes 1 to BATCH tasks at random (default 8 up to 40/s, "
        "then 8 more per 40/s: 400 at 2,000/s)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=300.0, help="seconds to let the work finish after the faults"
    )
    parser.add_argument("--rss-limit-mb", type=int, default=300, help="a broker above this is a violation")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and the ledger here (kept anyway on a violation)"
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="brokers, workers and producers on hosts in network namespaces (root, iproute2), "
        "PostgreSQL through a proxy; partitions among the faults, and a bound on stalls",
    )
    args = parser.parse_args()

    def progress(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)

    # SIGTERM (a CI timeout, a test teardown) unwinds like Ctrl-C, so every process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    opts = Options(
        duration=args.duration,
        seed=args.seed,
        dsn=args.dsn,
        brokers=args.brokers,
        workers=args.workers or (4 if args.netns else 3),
        rate=args.rate,
        batch=args.batch,
        drain_timeout=args.drain_timeout,
        rss_limit_mb=args.rss_limit_mb,
        workdir=args.workdir,
        scenario=args.scenario,
        netns=args.netns,
    )
    try:
        summary = run(opts, progress) if opts.scenario == "random" else run_scenario(opts, progress)
    except KeyboardInterrupt:
        progress("chaos: interrupted; everything started was stopped")
        return 2
    except Exception as exc:
        progress(f"chaos: the harness failed: {type(exc).__name__}: {exc}")
        raise SystemExit(2) from exc
    print(_table(summary))
    for violation in summary["violations"]:
        print(f"VIOLATION: {violation}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
