"""`conduit submit --wait` end to end, as the README shows it: against a broker and a worker it
prints the task's id at once, then how it ended and its result (or error), and exits with a code
that says how it ended; without a broker, a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import free_port
from test_e2e import running

from conduit.client import PermanentError, TaskContext, Worker


def conduit_submit(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "conduit", "submit", "--connect", endpoint, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def shouting_worker(endpoint: str) -> Worker:
    worker = Worker(endpoint, concurrency=2, poll_timeout=1.0)

    @worker.handler("shout")
    def shout(task: TaskContext) -> bytes:
        if task.payload == b"nothing":
            raise PermanentError("nothing to shout")
        return task.payload.upper() + b"!"

    return worker


def test_submit_wait_prints_id_state_and_result(start_broker, db) -> None:
    broker = start_broker()
    with running(shouting_worker(broker.endpoint)):
        done = conduit_submit(broker.endpoint, "shout", "hello", "--wait")
        piped = conduit_submit(broker.endpoint, "shout", "-", "--wait", "--json", stdin="from stdin")
        dead = conduit_submit(broker.endpoint, "shout", "nothing", "--wait", "--json")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    (task_id,) = [int(field[3:]) for field in done.stdout.split() if field.startswith("id=")]
    assert done.stdout == f"id={task_id}\nstate=completed attempt=1 result=HELLO!\n"
    assert db.query("SELECT state, result FROM results WHERE id = %s", (task_id,)) == [
        ("completed", b"HELLO!")
    ]
    assert piped.returncode == 0, piped.stderr
    first, last = map(json.loads, piped.stdout.splitlines())
    assert first == {"id": last["id"]}
    out = last
    assert out == {
        "id": out["id"],
        "state": "completed",
        "attempt": 1,
        "error": None,
        "result": "FROM STDIN!",
    }
    out = json.loads(dead.stdout.splitlines()[-1])
    assert (out["state"], out["result"]) == ("dead", None) and "nothing to shout" in out["error"]
    assert dead.returncode == 3  # dead, as --help lists


def test_submit_without_wait_prints_only_the_id(start_broker, db) -> None:
    broker = start_broker()  # no worker: the task stays pending, and the command does not wait
    proc = conduit_submit(broker.endpoint, "shout", "later", "--key", "k1")
    again = conduit_submit(broker.endpoint, "shout", "later", "--key", "k1")
    assert proc.returncode == 0 and proc.stdout.startswith("id="), proc.stderr
    assert again.stdout == proc.stdout  # the same key: the same task
    (task_id,) = db.query("SELECT id FROM live_tasks WHERE state = 'pending'")
    assert proc.stdout == f"id={task_id[0]}\n"


def test_submit_to_no_broker_is_a_one_line_error() -> None:
    proc = conduit_submit(f"tcp://127.0.0.1:{free_port()}", "shout", "anyone?")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "127.0.0.1" in line
