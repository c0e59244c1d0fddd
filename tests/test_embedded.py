"""The embedded PostgreSQL: one server per data folder, reused by every command on it; a default
folder per user; nothing stopped under someone else's broker; a broker that outlives its server
vanishing, logging an outage once; `--data-dir` refusing what it would have to create.

Every server here runs in a temporary folder of the test's own and is stopped by the test: the
default folders of the machine (/var/lib/conduit, ~/.local/share) are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from conftest import Process, free_port
from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.config import Settings, default_data_dir
from conduit.errors import ConduitError
from conduit.logs import Outage
from conduit.store import init_schema
from conduit.store.embedded import EmbeddedPostgres, stop_server

# Failure lines that a retry loop repeats for as long as the database is away.
RETRY_LINES = re.compile(r"event=(listen|reap|drop|reacquire)_failed")


@pytest.fixture
def home() -> Iterator[Path]:
    """A folder of this test's own (short: sockets live in the data folder); every server started
    under it is stopped afterwards, whatever the test did."""
    root = Path(tempfile.mkdtemp(prefix="conduit-emb-"))
    try:
        yield root
    finally:
        for pid_file in root.rglob("postmaster.pid"):
            stop_server(pid_file.parent, force=True)
        shutil.rmtree(root, ignore_errors=True)


def conduit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conduit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or own_env(),
    )


def own_env(**extra: str | Path) -> dict[str, str]:
    """This environment without any database or data folder it may name (CI exports its own)."""
    unset = ("CONDUIT_DSN", "CONDUIT_DATA_DIR", "XDG_DATA_HOME")
    return {k: v for k, v in os.environ.items() if k not in unset} | {k: str(v) for k, v in extra.items()}


def postmaster(pgdata: Path) -> int | None:
    """The pid of the server running in `pgdata`, read as PostgreSQL writes it."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def servers_in(folder: Path) -> list[int]:
    """Every postgres process whose command line names `folder`."""
    named = [
        (p.pid, p.info["name"] or "", p.info["cmdline"] or [])
        for p in psutil.process_iter(["name", "cmdline"])
    ]
    return [pid for pid, name, args in named if name.startswith("postgres") and str(folder) in " ".join(args)]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_default_data_dir_is_the_users_own() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/data/ann"}) == Path("/data/ann/conduit/pgdata")
    assert Settings.load({"XDG_DATA_HOME": "/data/ann"}).data_dir == Path("/data/ann/conduit/pgdata")
    assert Settings.load({"XDG_DATA_HOME": "/x", "CONDUIT_DATA_DIR": "/y/pg"}).data_dir == Path("/y/pg")
    # Root's server runs as a user of its own, which cannot enter /root: its default is in /var/lib.
    expected = "/var/lib/conduit/pgdata" if os.geteuid() == 0 else "/home/ann/.local/share/conduit/pgdata"
    assert default_data_dir({"HOME": "/home/ann"}) == Path(expected)


def test_commands_on_one_folder_reuse_one_server_and_each_user_has_their_own(home: Path) -> None:
    ann, bob = own_env(XDG_DATA_HOME=home / "ann"), own_env(XDG_DATA_HOME=home / "bob")
    ann_folder, bob_folder = home / "ann" / "conduit" / "pgdata", home / "bob" / "conduit" / "pgdata"
    first = conduit("db", "init", env=ann)  # the default folder's parents are created for it
    assert first.returncode == 0 and "created" in first.stdout, first
    pid = postmaster(ann_folder)
    assert pid is not None
    again = conduit("db", "init", env=ann)
    assert again.returncode == 0 and "already up to date" in again.stdout, again
    checked = conduit("db", "check", env=ann)
    assert checked.returncode == 0 and checked.stdout.startswith("store ok"), checked
    assert postmaster(ann_folder) == pid  # reused, not started again
    assert servers_in(ann_folder) == [pid]  # and no second one beside it

    other = conduit("db", "init", env=bob)
    assert other.returncode == 0 and "created" in other.stdout, other  # an empty database of his own
    bob_pid = postmaster(bob_folder)
    assert bob_pid is not None and bob_pid != pid and postmaster(ann_folder) == pid

    stopped = conduit("db", "stop", env=ann)
    assert stopped.returncode == 0 and f"stopped the embedded server in {ann_folder}" in stopped.stdout
    assert postmaster(ann_folder) is None and servers_in(ann_folder) == []
    assert postmaster(bob_folder) == bob_pid  # one user's stop leaves the other's server alone
    assert conduit("db", "stop", env=bob).returncode == 0 and postmaster(bob_folder) is None


@pytest.mark.parametrize("how", ["flag", "env", "broker"])
def test_data_dir_whose_parent_is_missing_is_refused_and_nothing_created(home: Path, how: str) -> None:
    target = home / "no" / "such" / "pgdata"
    env = own_env(CONDUIT_DATA_DIR=target) if how == "env" else own_env()
    args = ["db", "init"] if how != "broker" else ["broker", "--bind", f"tcp://127.0.0.1:{free_port()}"]
    if how != "env":
        args += ["--data-dir", str(target)]
    line = one_error_line(conduit(*args, env=env))
    assert f"refusing data folder {target}" in line
    assert f"would have created {home / 'no'}" in line and "PostgreSQL server" in line  # what it would do
    assert list(home.iterdir()) == []
    assert servers_in(target) == []


def test_data_dir_full_of_other_files_is_refused_and_left_as_it_was(home: Path) -> None:
    folder = home / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = folder.stat()
    line = one_error_line(conduit("db", "init", "--data-dir", str(folder)))
    assert f"refusing data folder {folder}: it holds other files" in line
    after = folder.stat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)  # not handed to the server
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and servers_in(folder) == []


def test_db_stop_refuses_while_sessions_are_connected_unless_forced(home: Path) -> None:
    pgdata = home / "pg"
    assert conduit("db", "init", "--data-dir", str(pgdata)).returncode == 0
    pid = postmaster(pgdata)
    dsn = EmbeddedPostgres(pgdata).dsn  # reuses the running server
    with psycopg.connect(dsn, autocommit=True) as conn:
        line = one_error_line(conduit("db", "stop", "--data-dir", str(pgdata)))
        assert "1 session(s) are connected" in line and "--force" in line
        assert conn.execute("SELECT 1").fetchone() == (1,) and postmaster(pgdata) == pid
    # Once nobody is connected, it stops.
    wait_for(lambda: "[local]" not in _backends(pid), timeout=10, what="the session to end")
    stopped = conduit("db", "stop", "--data-dir", str(pgdata))
    assert stopped.returncode == 0 and "stopped the embedded server" in stopped.stdout, stopped
    assert postmaster(pgdata) is None
    idle = conduit("db", "stop", "--data-dir", str(pgdata))
    assert idle.returncode == 0 and "no embedded server running" in idle.stdout, idle
    # --force stops it even under a session.
    assert conduit("db", "init", "--data-dir", str(pgdata)).returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        forced = conduit("db", "stop", "--force", "--data-dir", str(pgdata))
        assert forced.returncode == 0 and "stopped" in forced.stdout, forced
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert postmaster(pgdata) is None


def _backends(pid: int | None) -> str:
    if pid is None:
        return ""
    try:
        return " ".join(" ".join(child.cmdline()) for child in psutil.Process(pid).children())
    except psutil.Error:
        return ""


def _submit_until_accepted(client: Client, payload: bytes, until: float) -> int:
    """Submits are refused (`unavailable`) while the broker's connections are being remade."""
    while True:
        try:
            return client.submit("echo", payload)
        except ConduitError:
            if time.monotonic() > until:
                raise
            time.sleep(0.05)


def _echo_worker(endpoint: str) -> Worker:
    worker = Worker(endpoint, concurrency=2, poll_timeout=1.0)

    @worker.handler("echo")
    def echo(task: TaskContext) -> bytes:
        return task.payload

    return worker


def _broker(processes: list[Process], *db_args: str) -> tuple[Process, str]:
    broker = Process(
        ["broker", "--bind", f"tcp://127.0.0.1:{free_port()}", "--broker-id", "b1", *db_args],
        env={"CONDUIT_DSN": "", "CONDUIT_DATA_DIR": ""},  # empty is unset: the flags say which database
    )
    processes.append(broker)
    assert broker.proc.stdout is not None
    endpoint = broker.proc.stdout.readline().strip()
    assert endpoint, broker.log()
    return broker, endpoint


def test_broker_starts_its_vanished_embedded_server_again_and_resumes(home: Path, processes) -> None:
    pgdata = home / "pg"
    assert conduit("db", "init", "--data-dir", str(pgdata)).returncode == 0
    broker, endpoint = _broker(processes, "--data-dir", str(pgdata))
    with running(_echo_worker(endpoint)), Client(endpoint, timeout=5.0) as client:
        assert client.result(client.submit("echo", b"before"), timeout=30).result == b"before"
        first = postmaster(pgdata)
        # Someone else's `conduit db stop` leaves the server alone while the broker uses it...
        assert "session(s) are connected" in one_error_line(conduit("db", "stop", "--data-dir", str(pgdata)))
        assert postmaster(pgdata) == first
        # ...and when it is stopped under the broker anyway, the broker starts it again.
        assert conduit("db", "stop", "--force", "--data-dir", str(pgdata)).returncode == 0
        gone = time.monotonic()
        wait_for(lambda: postmaster(pgdata) not in (None, first), timeout=10, what="the server to be back")
        back = time.monotonic()
        assert back - gone < 5.0
        task_id = _submit_until_accepted(client, b"after", back + 5.0)
        assert client.result(task_id, timeout=back + 5.0 - time.monotonic()).result == b"after"
    log = broker.log()
    assert broker.proc.poll() is None and "Traceback" not in log
    assert len(RETRY_LINES.findall(log)) == 1, log  # the outage, once
    assert log.count("event=database_recovered") == 1, log
    assert servers_in(pgdata) == [postmaster(pgdata)]  # one server, the broker's restart


def test_broker_waits_out_a_database_it_cannot_start_with_one_line(home: Path, processes) -> None:
    """Given a DSN, a broker cannot start the server: it waits, and its retry loops say so once."""
    server = EmbeddedPostgres(home / "pg")
    init_schema(server.dsn, "conduit")
    broker, endpoint = _broker(processes, "--dsn", server.dsn)
    with running(_echo_worker(endpoint)), Client(endpoint, timeout=5.0) as client:
        assert client.result(client.submit("echo", b"before"), timeout=30).result == b"before"
        stop_server(home / "pg", force=True)
        time.sleep(6.0)  # six rounds of every retry loop
        assert len(RETRY_LINES.findall(broker.log())) == 1, broker.log()
        server.ensure_running()
        back = time.monotonic()
        task_id = _submit_until_accepted(client, b"after", back + 5.0)
        assert client.result(task_id, timeout=back + 5.0 - time.monotonic()).result == b"after"
    log = broker.log()
    assert broker.proc.poll() is None and "Traceback" not in log
    assert len(RETRY_LINES.findall(log)) == 1, log
    recovered = re.search(r"event=database_recovered failures=\d+ after_s=([\d.]+)", log)
    assert recovered and float(recovered.group(1)) >= 6.0, log  # one line for the whole outage


def test_outage_is_one_line_a_reminder_while_it_lasts_and_one_line_when_over() -> None:
    lines: list[logging.LogRecord] = []
    logger = logging.getLogger("conduit.test.outage")
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        outage = Outage(logger, "database", remind_every=0.3)
        outage.over()  # nothing was failing: nothing to say
        for _ in range(50):
            outage.failed("reap_failed", error="down")
        assert [r.getMessage() for r in lines] == ["reap_failed"]
        time.sleep(0.35)
        outage.failed("listen_failed", "warning", error="down")
        assert [r.getMessage() for r in lines] == ["reap_failed", "listen_failed"]
        assert lines[1].fields["failures"] == 51 and lines[1].levelname == "WARNING"  # type: ignore[attr-defined]
        outage.over()
        outage.over()
        assert [r.getMessage() for r in lines][2:] == ["database_recovered"]
        assert lines[2].fields["failures"] == 51 and lines[2].fields["after_s"] >= 0.3  # type: ignore[attr-defined]
        outage.failed("reap_failed", error="down again")  # a new outage is told again
        assert len(lines) == 4 and lines[3].fields == {"error": "down again"}  # type: ignore[attr-defined]
    finally:
        logger.removeHandler(handler)
