"""Settings precedence, and the errors a user meets: bad DSN, missing schema, bad settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conduit.config import Settings
from conduit.errors import ConfigError, DatabaseError, SchemaError
from conduit.store import Store


def test_flags_override_environment() -> None:
    env = {
        "CONDUIT_DSN": "postgresql://env/db",
        "CONDUIT_SCHEMA": "fromenv",
        "CONDUIT_MAX_PAYLOAD_BYTES": "10",
    }
    settings = Settings.load(env, schema="fromflag", dsn=None)
    assert (settings.dsn, settings.schema, settings.max_payload_bytes) == (
        "postgresql://env/db",
        "fromflag",
        10,
    )
    with pytest.raises(ConfigError, match="whole number"):
        Settings.load({"CONDUIT_MAX_PAYLOAD_BYTES": "lots"})
    with pytest.raises(ConfigError, match="schema name"):
        Settings.load({}, schema="Robert'); DROP")
    with pytest.raises(dataclasses_frozen_error()):
        settings.schema = "x"  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_unreachable_server_names_host_and_cause() -> None:
    with pytest.raises(DatabaseError, match=r"127\.0\.0\.1:1/nowhere: .*refused"):
        Store.open("postgresql://postgres@127.0.0.1:1/nowhere")


def test_malformed_dsn() -> None:
    with pytest.raises(DatabaseError, match="invalid DSN"):
        Store.open("this is not a dsn")


def test_missing_schema_says_what_to_run(db) -> None:
    with pytest.raises(SchemaError, match="conduit db init"):
        Store.open(db.dsn, schema="never_initialised")


@pytest.mark.parametrize("dsn", ["postgresql://postgres@127.0.0.1:1/nowhere", "not a dsn"])
def test_cli_bad_dsn_is_one_line_on_stderr(dsn: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conduit", "db", "init", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")


def test_cli_init_check_and_status_on_a_server(db) -> None:
    def conduit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conduit", *args, "--dsn", db.dsn, "--schema", db.schema],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert "already up to date" in conduit("db", "init").stdout
    check = conduit("db", "check")
    assert check.returncode == 0 and "store ok" in check.stdout
    status = conduit("status", "--json")
    assert status.returncode == 0 and '"conduit.check": {"completed": 1}' in status.stdout
