"""Mixed demo: Python producers, a Node.js worker and a Python worker on one queue.

    python clients/node/examples/mixed.py [--dsn postgresql://...] [--tasks 200]

Starts a broker (on the embedded PostgreSQL unless --dsn), a Python worker process and a Node
worker process, submits tasks to queue "greet" from Python in small batches, reads every result
back in Python and shows which language ran each task. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from conduit.client import Client
from conduit.config import Settings
from conduit.demo import Cluster
from conduit.store import dsn_for, init_schema
from conduit.task import TaskSpec

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded one)")
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    settings = Settings.load(dsn=args.dsn)
    url = dsn_for(settings)
    init_schema(url, settings.schema)
    cluster = Cluster(url, settings.schema, workers=0)  # close() stops workers, then the broker
    try:
        endpoint = cluster.endpoint
        env = {**os.environ, "CONDUIT_DEMO_ENDPOINT": endpoint, "PYTHONPATH": str(HERE)}
        cluster.add_worker([sys.executable, "-m", "conduit", "worker", "greet_worker:worker"], env)
        cluster.add_worker(["node", str(HERE / "worker.js"), endpoint])
        print(f"broker at {endpoint}; a Python and a Node worker on queue 'greet'", file=sys.stderr)
        answers = []
        with Client(endpoint) as client:
            for start in range(0, args.tasks, 10):  # small batches: both workers are polling
                names = [f"task-{i}" for i in range(start, min(start + 10, args.tasks))]
                ids = client.submit_many([TaskSpec("greet", name.encode()) for name in names])
                answers += [(i, json.loads(client.result(i, timeout=60).result or b"{}")) for i in ids]
                time.sleep(0.02)
        for task_id, answer in answers[:6]:
            print(f"task {task_id}: {answer['greeting']!r} by {answer['by']} (pid {answer['pid']})")
        by = Counter(answer["by"] for _, answer in answers)
        print(
            f"{len(answers)} tasks submitted from Python: "
            + ", ".join(f"{n} ran in {k}" for k, n in by.items())
        )
        if set(by) != {"python", "node"}:
            sys.exit("expected both languages to run tasks")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
