"""The CLI mistakes a new user made (issue 14), each answered at once: the exact one-line error on
stderr, the exit code, no traceback, within 3 s. And `submit --wait` as a script relies on it:
the id first, an exit code for how the task ended, a warning when no worker serves the queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conduit.client import Client


def conduit(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "conduit", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - began


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (
            ["submit", "emails", "x", "--connect", "127.0.0.1:5555"],
            2,
            "Error: Invalid value for '--connect': endpoint '127.0.0.1:5555' has no transport: "
            "write tcp://127.0.0.1:5555 (see 'python -m conduit submit --help')",
        ),
        (
            ["status", "--gossip", "a,b,c"],
            2,
            "Error: Invalid value for '--gossip': endpoint 'a' has no transport: write tcp://a "
            "(see 'python -m conduit status --help')",
        ),
        (
            ["demo", "--single", "0"],
            2,
            "Error: Invalid value for '--single': 0 is not in the range x>=1 "
            "(see 'python -m conduit demo --help')",
        ),
        (
            ["worker", "handlers:worker", "--connect", "localhost:5555"],
            2,
            "Error: Invalid value for '--connect': endpoint 'localhost:5555' has no transport: "
            "write tcp://localhost:5555 (see 'python -m conduit worker --help')",
        ),
        (
            ["workers", "--connect", "localhost:5555"],
            2,
            "Error: Invalid value for '--connect': endpoint 'localhost:5555' has no transport: "
            "write tcp://localhost:5555 (see 'python -m conduit workers --help')",
        ),
        (
            ["broker", "--bind", "tcp://127.0.0.1"],
            2,
            "Error: Invalid value for '--bind': endpoint 'tcp://127.0.0.1' is not tcp://HOST:PORT, "
            "ipc://PATH or inproc://NAME (see 'python -m conduit broker --help')",
        ),
        (
            ["broker", "--bind", "tcp://*:5555", "--dsn", "postgresql://nobody@127.0.0.1:1/x"],
            2,
            "Error: tcp://*:5555 binds every interface, which peers on other hosts cannot connect to: "
            "give --advertise tcp://ADDRESS:PORT, the address they reach this broker by "
            "(see 'python -m conduit broker --help')",
        ),
        (
            ["broker", "--bind", "tcp://0.0.0.0:5555", "--advertise", "tcp://0.0.0.0:5555"],
            2,
            "Error: --advertise tcp://0.0.0.0:5555: name an address peers can connect to "
            "(see 'python -m conduit broker --help')",
        ),
        (
            ["broker", "--advertise", "10.0.0.5:5555"],
            2,
            "Error: Invalid value for '--advertise': endpoint '10.0.0.5:5555' has no transport: "
            "write tcp://10.0.0.5:5555 (see 'python -m conduit broker --help')",
        ),
        (
            ["broker", "--pub", "tcp://0.0.0.0:5556", "--advertise", "tcp://10.0.0.5:5555"],
            2,
            "Error: tcp://0.0.0.0:5556 binds every interface, which peers on other hosts cannot connect "
            "to: give --advertise-pub tcp://ADDRESS:PORT, the address they reach this broker by "
            "(see 'python -m conduit broker --help')",
        ),
        (
            ["submit", "emails", "x", "--connect", "tcp://127.0.0.1:*"],
            2,
            "Error: Invalid value for '--connect': endpoint 'tcp://127.0.0.1:*': port * is only for binding; "
            "name the broker's port (see 'python -m conduit submit --help')",
        ),
        (
            ["tasks", "list", "--older-than", "soon", "--dsn", "postgresql://nobody@127.0.0.1:1/x"],
            2,
            "Error: Invalid value for '--older-than': 'soon' is not a duration such as 90, 90s, 15m, "
            "2h or 7d (see 'python -m conduit tasks list --help')",
        ),
        (
            ["submit", "emails", "x", "--priority", "40000"],
            2,
            "Error: Invalid value for '--priority': 40000 is not in the range -32768<=x<=32767 "
            "(see 'python -m conduit submit --help')",
        ),
        (
            ["tasks", "cancel"],
            2,
            "Error: Missing argument 'IDS...' (see 'python -m conduit tasks cancel --help')",
        ),
        (["nonsense"], 2, "Error: No such command 'nonsense' (see 'python -m conduit --help')"),
    ],
)
def test_each_mistake_is_one_line_and_an_exit_code_at_once(args: list[str], code: int, line: str) -> None:
    proc, took = conduit(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "", line + "\n")
    assert took < 3.0, took


def test_status_takes_gossip_endpoints_repeated_or_with_commas(start_broker, db) -> None:
    one, two = (
        start_broker("--pub", "tcp://127.0.0.1:0", broker_id="g1"),
        start_broker("--pub", "tcp://127.0.0.1:0", broker_id="g2"),
    )
    base = ["status", "--json", "--dsn", db.dsn, "--schema", db.schema]
    commas, _ = conduit(*base, "--gossip", f"{one.pub},{two.pub}")
    repeated, _ = conduit(*base, "--gossip", one.pub, "--gossip", two.pub)
    for proc in (commas, repeated):
        assert proc.returncode == 0, proc.stderr
        assert sorted(json.loads(proc.stdout)["brokers"]) == ["g1", "g2"]
    helped, _ = conduit("status", "--help")
    assert "repeat the option or separate endpoints with commas" in " ".join(helped.stdout.split())


def test_submit_options_are_flags(start_broker, db) -> None:
    broker = start_broker()
    proc, _ = conduit(
        *(
            "submit",
            "opts",
            "x",
            "--connect",
            broker.endpoint,
            "--max-attempts",
            "2",
            "--lease-timeout",
            "7.5",
        ),
        *("--backoff-base", "0.5", "--backoff-max", "9", "--priority", "-4", "--delay", "600", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    task_id = json.loads(proc.stdout)["id"]
    assert db.query(
        "SELECT t.priority, p.max_attempts, p.lease_timeout, p.backoff_base, p.backoff_max,"
        " t.run_at > now() + interval '500 seconds'"
        " FROM tasks t JOIN policies p ON p.id = t.policy WHERE t.id = %s",
        (task_id,),
    ) == [(-4, 2, 7.5, 0.5, 9.0, True)]
    helped, _ = conduit("submit", "--help")
    assert "Exit codes: 0 submitted" in helped.stdout and "3 dead; 4 cancelled" in " ".join(
        helped.stdout.split()
    )


def waiting_submit(endpoint: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """`submit --wait` started, and the id it printed first, read while it waits."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conduit",
            "submit",
            "nobody-serves",
            "x",
            "--connect",
            endpoint,
            "--wait",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("id="), first
    return proc, int(first[3:])


def test_submit_wait_prints_the_id_first_and_exits_4_when_cancelled(start_broker, db) -> None:
    broker = start_broker()
    proc, task_id = waiting_submit(broker.endpoint)
    assert proc.poll() is None  # still waiting, and the id is known
    with Client(broker.endpoint) as client:
        assert client.cancel(task_id)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 4, err
    assert out == "state=cancelled attempt=0\n"


def test_submit_wait_warns_when_no_worker_polls_and_gives_up_at_its_timeout(start_broker, db) -> None:
    broker = start_broker()
    began = time.monotonic()
    proc, task_id = waiting_submit(broker.endpoint, "--timeout", "5")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 5 and time.monotonic() - began < 9
    assert err.splitlines() == [
        "warning: no worker has polled queue 'nobody-serves' on the brokers in the last minute; "
        "the task waits until one does",
        f"Error: task {task_id} is still pending after 5s",
    ]
    assert out == "state=pending attempt=0\n"


def test_interrupting_submit_wait_says_which_task_goes_on(start_broker, db) -> None:
    broker = start_broker()
    proc, task_id = waiting_submit(broker.endpoint)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out, err) == (130, "", f"Error: interrupted; task {task_id} goes on\n")
