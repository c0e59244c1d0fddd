"""The liveness shapes: fixed fault schedules on a warm mesh under a steady load, each checked
against what the product promises (docs/PROTOCOL.md §11) as well as every invariant.

- broker_pause: the broker serving the most workers is SIGSTOPped for 8-15 s, then SIGCONT.
- broker_pause_each: each broker in turn (in a seeded order) is SIGSTOPped for 4-6 s, 2 s apart;
  every pause outlives the brokers' 3 s lease term, so every broker's buffer is taken over once.
- broker_kill: the broker serving the most workers is SIGKILLed and restarted 3-5 s later, so
  the workers must move rather than wait for it to come back.

Bounds: every submit is acknowledged within SUBMIT_BOUND and none raises; the mesh never goes
START_GAP_BOUND without starting a task; after a kill every worker starts new work (a task that
another broker delivered) within BACK_TO_WORK_BOUND, and after a pause every worker that the
paused broker was serving does so within BACK_AFTER_PAUSE_BOUND (a worker left waiting on it
would not show in the mesh's gap while the others carry the load). A worker's clock starts once
it has started what it had prefetched from the broker hit and has a free slot: until then it
had work. Durations and victims come from the seed."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from chaos.cluster import Cluster, Member
from chaos.faults import Fault, kill, pause
from chaos.harness import Options, Session
from chaos.ledger import read_ledger
from chaos.liveness import back_to_work, served_by

SCENARIOS = ("broker_pause", "broker_pause_each", "broker_kill")
SUBMIT_BOUND = 3.0  # seconds: a keyed submit is retried on another broker after ~2 s of silence
START_GAP_BOUND = 3.0  # seconds without any task starting anywhere in the mesh
BACK_TO_WORK_BOUND = 2.0  # seconds from a broker's kill until every worker has new work
# Seconds from a broker's pause until each worker it served has new work: two liveness intervals
# to leave it, and two more in which the producers, waiting on the same broker, submit nothing.
BACK_AFTER_PAUSE_BOUND = 4.0
LEAD = 3.0  # seconds of steady load on the warm mesh before the first fault
TAIL = 5.0  # seconds of load after the last fault: the paused broker comes back and catches up


def busiest(cluster: Cluster, rng: random.Random) -> Member:
    """The broker that delivered to the most workers in the last two seconds (seeded among
    equals): the fault that hurts most."""
    now = time.time()
    recent = {(r.pid, r.broker) for r in read_ledger(cluster.ledger_dir) if now - r.start < 2}
    serving = Counter(broker for _, broker in recent)
    brokers = rng.sample(cluster.brokers, len(cluster.brokers))
    return max(brokers, key=lambda m: serving[m.name])


def _schedule(
    name: str, cluster: Cluster, rng: random.Random, progress: Callable[[str], None]
) -> list[Fault]:
    faults: list[Fault] = []

    def done(fault: Fault) -> None:
        faults.append(fault)
        progress(f"fault {fault.kind} {fault.target} {fault.detail}")

    time.sleep(LEAD)
    if name == "broker_pause":
        done(pause(cluster, "broker_pause", busiest(cluster, rng), rng.uniform(8.0, 15.0)))
    elif name == "broker_pause_each":
        for i, member in enumerate(rng.sample(cluster.brokers, len(cluster.brokers))):
            if i:
                time.sleep(2.0)
            done(pause(cluster, "broker_pause", member, rng.uniform(4.0, 6.0)))
    elif name == "broker_kill":
        done(kill(cluster, "broker_kill", busiest(cluster, rng), rng.uniform(3.0, 5.0)))
    else:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    time.sleep(TAIL)
    return faults


def run_scenario(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run `opts.scenario`; returns the summary with its liveness figures and violations."""
    if opts.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {opts.scenario!r}; choose one of {', '.join(SCENARIOS)}")
    with Session(opts, progress, steady=True) as session:
        cluster = session.mesh()
        t0 = session.warm()
        progress(f"chaos: warm; {session.acknowledged()} tasks acknowledged so far")
        faults = _schedule(opts.scenario, cluster, random.Random(f"{opts.seed}-{opts.scenario}"), progress)
        load_end = session.stop_load()
        drained = session.drain()
        summary, verdict, runs = session.audit(faults, t0, load_end)
        summary["drain_s"] = round(drained, 1)
        summary["bounds"] = {
            "max_submit_latency_s": SUBMIT_BOUND,
            "longest_start_gap_s": START_GAP_BOUND,
            "back_to_work_after_kill_s": BACK_TO_WORK_BOUND,
            "back_to_work_after_pause_s": BACK_AFTER_PAUSE_BOUND,
        }
        slowest = summary["max_submit_latency_s"]
        if slowest is None or slowest > SUBMIT_BOUND:
            verdict.violate(
                f"a submit took {slowest}s (at t={summary['max_submit_latency_at']}s); "
                f"the bound is {SUBMIT_BOUND:g}s"
            )
        if summary["submit_errors"]:
            failures = [f for p in session.producers for f in p.failures]
            verdict.violate(f"{len(failures)} submits raised, the first: {failures[0]}")
        if summary["longest_start_gap_s"] > START_GAP_BOUND:
            verdict.violate(
                f"no task started for {summary['longest_start_gap_s']}s from "
                f"t={summary['longest_start_gap_at']}s; the bound is {START_GAP_BOUND:g}s"
            )
        # Per fault, per worker: was it getting work from the broker hit, and how soon did it
        # start a task that another broker delivered?
        summary["back_to_work"] = []
        for f in faults:
            bound = BACK_TO_WORK_BOUND if f.kind == "broker_kill" else BACK_AFTER_PAUSE_BOUND
            rows = []
            for w in cluster.workers:
                pids = set(w.pids)
                busy, back = back_to_work(runs, pids, (f.start, f.end), f.target, opts.concurrency)
                row = {
                    "fault": f"{f.kind} {f.target}",
                    "at": round(f.start - t0, 1),
                    "worker": w.name,
                    "was_served_by_it": served_by(runs, pids, f.target, f.start),
                    "busy_s": round(busy, 3),  # with old work first: the clock starts after it
                    "seconds": None if back is None else round(back, 3),
                }
                rows.append(row)
                # After a kill every worker must have new work soon; after a pause, those it served.
                if (f.kind == "broker_kill" or row["was_served_by_it"]) and (back is None or back > bound):
                    verdict.violate(
                        f"{w.name} got no new work for {row['seconds']}s after {f.kind} {f.target} at "
                        f"t={row['at']}s (and {row['busy_s']}s busy with old work); the bound is {bound:g}s"
                    )
            if opts.scenario != "broker_pause_each" and not any(r["was_served_by_it"] for r in rows):
                verdict.violate(f"{f.target} served no worker when the fault began: it proved nothing")
            summary["back_to_work"].extend(rows)
        return session.conclude(summary, verdict)
