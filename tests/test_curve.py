"""CURVE security end to end: key files, a broker's allow-list, and what goes over the wire."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port
from netns.hosts import Network, unavailable
from netns.pgproxy import PgProxy
from test_e2e import running, wait_for

from conduit.broker.gate import AllowList
from conduit.client import BrokerTimeout, Client, TaskContext, Worker
from conduit.curve import ClientCurve, new_keys, read_keypair, read_public

NO_HOSTS = unavailable()


def conduit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conduit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


class Keys:
    """A mesh's key files: the broker's pair, an allow-list folder, and clients' pairs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.allow = root / "allow"
        self.allow.mkdir()
        self.server_public, self.server_secret = new_keys("broker", root)

    def client(self, name: str, *, allowed: bool = True) -> ClientCurve:
        _, secret = new_keys(name, self.root)
        if allowed:
            self.let_in(name)
        curve = ClientCurve.load(secret, self.server_public)
        assert curve is not None
        return curve

    def let_in(self, name: str) -> None:
        shutil.copy(self.root / f"{name}.key", self.allow / f"{name}.key")

    def broker_args(self) -> tuple[str, ...]:
        secure = ("--curve-secret", str(self.server_secret), "--curve-allow", str(self.allow))
        return ("--pub", "tcp://127.0.0.1:*", *secure)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def test_keys_new_writes_a_pair_once_and_show_prints_the_public_key(tmp_path: Path) -> None:
    made = conduit("keys", "new", "alice", "--dir", str(tmp_path), "--json")
    assert made.returncode == 0, made.stderr
    public, secret = tmp_path / "alice.key", tmp_path / "alice.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    pair = read_keypair(secret)
    assert read_public(public) == pair.public and len(pair.secret) == 40
    assert conduit("keys", "show", str(public)).stdout.strip() == pair.public.decode()
    assert conduit("keys", "show", str(secret)).stdout.strip() == pair.public.decode()
    before = secret.read_bytes()
    again = conduit("keys", "new", "alice", "--dir", str(tmp_path))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert secret.read_bytes() == before


def test_bad_key_files_are_one_line_errors_at_start(keys: Keys, db) -> None:
    secret = keys.root / "mode.key_secret"
    shutil.copy(keys.server_secret, secret)
    secret.chmod(0o644)
    (keys.root / "junk.key").write_text('public-key = "not z85 at all"\n')
    common = ("--dsn", db.dsn, "--schema", db.schema, "--bind", f"tcp://127.0.0.1:{free_port()}")
    broker, allow = str(keys.server_secret), str(keys.allow)
    client = ("submit", "q", "x", "--curve-secret", broker, "--curve-server")
    cases = [
        (("broker", *common, "--curve-secret", str(secret), "--curve-allow", allow), "chmod 600"),
        (("broker", *common, "--curve-secret", "nope.key_secret", "--curve-allow", allow), "No such file"),
        (("broker", *common, "--curve-secret", broker), "--curve-allow"),
        (("broker", *common, "--curve-secret", broker, "--curve-allow", "/nonexistent"), "no such folder"),
        ((*client, str(keys.root / "junk.key")), "not 40 characters of Z85"),
        ((*client, broker), "holds a secret key"),
        (("status", "--curve-secret", str(keys.server_public), "--curve-server", "x"), "open to others"),
        (("workers", "--curve-server", str(keys.server_public)), "--curve-secret"),
    ]
    for args, expected in cases:
        run = conduit(*args)
        assert run.returncode != 0, args
        assert run.stderr.count("\n") == 1 and expected in run.stderr, run.stderr


def test_an_unallowed_key_gets_no_reply_and_changes_nothing(keys: Keys, start_broker, db) -> None:
    broker = start_broker(*keys.broker_args())
    stranger = keys.client("mallory", allowed=False)
    for _ in range(3):
        with Client(broker.endpoint, curve=stranger, timeout=2) as client, pytest.raises(BrokerTimeout) as no:
            client.submit("secured", b"payload")
        assert "allow-list" in str(no.value)
    with Client(broker.endpoint, timeout=2) as plain, pytest.raises(BrokerTimeout):  # no CURVE at all
        plain.submit("secured", b"payload")
    for table in ("tasks", "results", "submit_keys", "idempotency_keys"):
        assert db.query(f"SELECT count(*) FROM {table}") == [(0,)], table
    log = broker.log()
    assert log.count("event=curve_refused") == 1, log  # once per key, not per connection
    assert read_public(keys.root / "mallory.key").decode() in log


def test_an_allowed_key_submits_polls_completes_and_hears_gossip(keys: Keys, start_broker) -> None:
    broker = start_broker(*keys.broker_args())
    wait_for(lambda: "curve=on" in broker.log(), what="the broker's start line")
    assert "security_off" not in broker.log()
    worker = Worker(broker.endpoint, poll_timeout=1, curve=keys.client("worker"))

    @worker.handler("secured")
    def upper(task: TaskContext) -> bytes:
        return task.payload.upper()

    with running(worker), Client(broker.endpoint, gossip=[broker.pub], curve=keys.client("app")) as client:
        first = client.submit("secured", b"hello")
        assert client.result(first, timeout=30).result == b"HELLO"
        wait_for(lambda: [b.broker for b in client.brokers()] == ["b1"], what="gossip over CURVE")


def test_a_key_added_to_the_allow_list_works_without_a_restart(keys: Keys, start_broker) -> None:
    broker = start_broker(*keys.broker_args())
    worker = Worker(broker.endpoint, poll_timeout=1, curve=keys.client("late", allowed=False))

    @worker.handler("secured")
    def echo(task: TaskContext) -> bytes:
        return task.payload

    with running(worker), Client(broker.endpoint, curve=keys.client("app")) as client:
        task = client.submit("secured", b"waits")
        time.sleep(1.5)
        assert client.lookup([task])[0].state == "pending"  # the worker is refused
        keys.let_in("late")  # neither the broker nor the worker restarts
        assert client.result(task, timeout=30).result == b"waits"
    log = broker.log()
    assert read_public(keys.root / "late.key").decode() in log  # refused, then let in
    assert log.count("event=curve_allow_loaded") >= 2 and "keys=2" in log


def _captured(port: int, submit: object, tmp_path: Path, interface: str = "lo") -> bytes:
    """The bytes tshark saw on `interface` to and from `port` while `submit()` ran."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    pcap = tmp_path / f"{port}.pcap"
    capture = subprocess.Popen(
        ["tshark", "-i", interface, "-f", f"tcp port {port}", "-w", str(pcap)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert capture.stderr is not None
        for line in capture.stderr:  # capturing once it says so
            if "Capturing on" in line:
                break
        else:
            pytest.skip(f"tshark cannot capture here (exit {capture.wait()})")
        time.sleep(0.3)
        submit()  # type: ignore[operator]
        time.sleep(0.5)
    finally:
        capture.send_signal(signal.SIGINT)
        capture.wait(10)
    return pcap.read_bytes()


@pytest.mark.parametrize("secure", [True, False])
def test_a_capture_of_the_broker_port_shows_the_payload_only_without_curve(
    keys: Keys, start_broker, db, tmp_path: Path, secure: bool
) -> None:
    if os.geteuid() != 0:
        pytest.skip("capturing on loopback needs root")
    port = free_port()
    start_broker(*(keys.broker_args() if secure else ()), port=port)
    payload = f"conduit-known-payload-{uuid.uuid4().hex}".encode()
    curve = keys.client("app") if secure else None

    def submit() -> None:
        with Client(f"tcp://127.0.0.1:{port}", curve=curve) as client:
            client.submit("wire", payload)

    seen = _captured(port, submit, tmp_path)
    assert db.query("SELECT count(*) FROM tasks")[0][0] == 1  # the submit went through either way
    assert (b"CURVE" if secure else b"NULL") in seen  # the ZMTP greeting names the mechanism: captured
    assert (payload in seen) is not secure
    assert (payload[-16:] in seen) is not secure


@pytest.mark.skipif(NO_HOSTS is not None and not os.environ.get("CI"), reason=f"no test hosts: {NO_HOSTS}")
@pytest.mark.parametrize("secure", [True, False])
def test_a_capture_on_the_test_bridge_shows_the_payload_only_without_curve(
    keys: Keys, db, tmp_path: Path, secure: bool
) -> None:
    """As above, across hosts: a client host submits to a broker host, and tshark listens on the
    test network's bridge only, where their traffic is all there is."""
    with Network(brokers=1, workers=0, clients=1) as net:
        proxy = PgProxy(db.dsn, net.db_gateway).start()
        argv = [sys.executable, "-m", "conduit", "broker", *net.broker_options("b1")]
        argv += ["--broker-id", "b1", "--dsn", proxy.dsn(), "--schema", db.schema]
        if secure:
            argv += ["--curve-secret", str(keys.server_secret), "--curve-allow", str(keys.allow)]
        broker = net.popen("b1", argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            endpoint = broker.stdout.readline().strip()  # type: ignore[union-attr]
            assert endpoint == f"tcp://{net.host('b1').address}:5555", endpoint
            payload = f"conduit-known-payload-{uuid.uuid4().hex}".encode()
            with net.enter("c1"):
                client = Client([endpoint], curve=keys.client("app") if secure else None, timeout=10)

            def submit() -> None:
                with client:
                    client.submit("wire", payload)

            seen = _captured(5555, submit, tmp_path, interface=net.bridges[0])
        finally:
            broker.terminate()
            broker.wait(30)
            broker.stdout.close()  # type: ignore[union-attr]
            proxy.close()
    assert db.query("SELECT count(*) FROM tasks")[0][0] == 1  # the submit went through either way
    assert (b"CURVE" if secure else b"NULL") in seen
    assert (payload in seen) is not secure
    assert (payload[-16:] in seen) is not secure


def test_the_commands_that_talk_to_brokers_take_keys_from_flags_or_the_environment(
    keys: Keys, start_broker, db
) -> None:
    keys.client("cli")
    broker = start_broker(*keys.broker_args())
    flags = ("--curve-secret", str(keys.root / "cli.key_secret"), "--curve-server", str(keys.server_public))
    env = {"CONDUIT_CURVE_SECRET": flags[1], "CONDUIT_CURVE_SERVER": flags[3]}
    by_flags = conduit("submit", "cli", "one", "--connect", broker.endpoint, "--json", *flags)
    assert by_flags.returncode == 0, by_flags.stderr
    by_env = conduit("submit", "cli", "two", "--connect", broker.endpoint, env=env)
    assert by_env.returncode == 0 and by_env.stdout.startswith("id="), by_env.stderr
    bare = conduit("submit", "cli", "three", "--connect", broker.endpoint)
    assert bare.returncode == 1 and "no connection" in bare.stderr
    database = ("--dsn", db.dsn, "--schema", db.schema)
    status = conduit("status", *database, "--gossip", broker.pub, "--json", *flags)
    assert json.loads(status.stdout)["queues"]["cli"]["pending"] == 2
    assert list(json.loads(status.stdout)["brokers"]) == ["b1"]  # its gossip, heard over CURVE
    workers = conduit("workers", "--connect", broker.endpoint, "--json", *flags)
    assert workers.returncode == 0 and json.loads(workers.stdout) == {"workers": []}


def test_the_allow_list_reads_only_public_key_files_and_logs_a_refusal_once(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "allow"
    folder.mkdir()
    good, good_secret = new_keys("good", tmp_path)
    _, stray_secret = new_keys("stray", tmp_path)
    shutil.copy(good, folder)
    shutil.copy(stray_secret, folder)  # a secret file put there by mistake: never read as allowed
    (folder / "broken.key").write_text("not a key\n")
    (folder / "notes.txt").write_text("ignored\n")
    allow = AllowList(folder)
    assert allow.keys == {read_public(good)}
    stray = read_keypair(folder / stray_secret.name).public
    assert not any(allow.allows(stray, "10.0.0.9") for _ in range(5))
    assert allow.allows(read_keypair(good_secret).public, "10.0.0.8")
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("curve_refused") == 1
    assert lines.count("curve_key_skipped") == 2  # the secret file and the broken one, once each
