"""Brokers on PostgreSQL over TLS: the DSN's sslmode reaches libpq unchanged.

A throwaway cluster of the machine's PostgreSQL (initdb in a temporary folder, its own port,
`ssl = on` with a self-signed certificate for 127.0.0.1, `hostssl` lines only), never the
machine's own cluster. Skipped where there is no initdb, no openssl, or no root to run initdb
as the postgres user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import BrokerProcess, Database, free_port
from test_curve import conduit
from test_e2e import running

from conduit.client import Client, TaskContext, Worker


def _initdb() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found[-1] if found else shutil.which("initdb")


def _as_postgres(*cmd: str, check: bool = True) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True, timeout=60)


def _certificate(folder: Path, name: str) -> Path:
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return folder / f"{name}.crt"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[str, Path, Path]]:
    """(DSN base for 127.0.0.1:port, the server's certificate, another certificate)."""
    initdb = _initdb()
    if initdb is None or shutil.which("openssl") is None or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL's initdb, openssl and runuser")
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a throwaway cluster as the postgres user")
    bindir = Path(initdb).parent
    folder = Path(tempfile.mkdtemp(prefix="conduit-tls-"))
    data, port = folder / "data", free_port()
    try:
        cert = _certificate(folder, "server")
        other = _certificate(folder, "other")
        shutil.chown(folder, "postgres")
        for f in ("server.key", "server.crt"):
            shutil.chown(folder / f, "postgres")
            (folder / f).chmod(0o600)
        _as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{folder}'\n"
                f"ssl = on\nssl_cert_file = '{folder}/server.crt'\nssl_key_file = '{folder}/server.key'\n"
                "fsync = off\n"
            )
        (data / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\n")  # TLS or nothing
        _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start")
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot start a throwaway PostgreSQL with ssl = on here: {exc}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", cert, other
    finally:
        _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_broker_on_a_verify_full_dsn_runs_tasks_over_tls_only(tls_server, processes) -> None:
    base, cert, _ = tls_server
    dsn = f"{base}?sslmode=verify-full&sslrootcert={cert}"
    schema = f"t_{uuid.uuid4().hex[:12]}"
    assert conduit("db", "init", "--dsn", dsn, "--schema", schema).returncode == 0
    broker = BrokerProcess(Database(dsn, schema), free_port(), "tls")
    processes.append(broker)
    worker = Worker(broker.endpoint, poll_timeout=1)

    @worker.handler("tls")
    def echo(task: TaskContext) -> bytes:
        return task.payload

    with running(worker), Client(broker.endpoint) as client:
        task = client.submit("tls", b"over tls")
        assert client.result(task, timeout=30).result == b"over tls"
    with psycopg.connect(dsn) as conn:
        (everyone,) = conn.execute(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.backend_type = 'client backend'"
        ).fetchall()
    assert everyone[0] >= 4 and everyone[1] is True  # the broker's threads, and this one: all TLS


def test_a_dsn_without_tls_or_with_the_wrong_root_is_refused_in_one_line(tls_server) -> None:
    base, _, other = tls_server
    for dsn, why in [
        (f"{base}?sslmode=disable", "no pg_hba.conf entry"),
        (f"{base}?sslmode=verify-full&sslrootcert={other}", "certificate verify failed"),
    ]:
        run = conduit("db", "init", "--dsn", dsn)
        assert run.returncode == 1 and run.stderr.count("\n") == 1 and why in run.stderr, run.stderr
