"""Test hosts in network namespaces: brokers, workers and clients, each at an address of its own.

Two bridges join them, as a data centre's two networks would: the **mesh** network (every host:
brokers, workers, clients) and the **database** network (the brokers and this machine, where a
proxy stands in front of PostgreSQL, `tests/netns/pgproxy.py`). Two, so that a broker can be cut
off from its workers while it still reaches the database (the seed's corner case), and the other
way round.

A link is cut by taking the bridge's end of the host's veth down (the host sees no carrier: what
it sends is lost, nothing is refused, as when a cable is pulled) and healed by bringing it up.
Names carry a tag of the run's own and the subnets are chosen free, so parallel runs never meet;
`close` removes everything, and a `Network` is a context manager, so a failure removes it too.
Namespace names also carry the pid that made them, so what a killed run left behind is swept
away by the next one (`sweep`).

Processes run in a host with `popen` (`ip netns exec`, which execs: the pid is the program's).
Threads of this process enter a host with `enter`: a network namespace is per thread on Linux,
and a ZeroMQ context made there starts its I/O threads there, so its sockets stay in that host
whichever thread uses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
_NAME = re.compile(r"cdt(\w{4})-(\d+)-\w+")  # cdt<tag>-<pid>-<host>
LINKS = ("mesh", "db")


def unavailable() -> str | None:
    """Why hosts cannot be made here (not root, no iproute2, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian's iproute2)"
    probe = f"cdt-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sweep() -> None:
    """Remove the namespaces, veths and bridges of networks whose process is gone (SIGKILLed)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    stale = {m[1] for n in listed if (m := _NAME.fullmatch(n)) and not Path(f"/proc/{m[2]}").exists()}
    if not stale:
        return
    for ns in (n for n in listed if (m := _NAME.fullmatch(n)) and m[1] in stale):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for name in re.findall(r"^\d+: (cd(\w{4})\w*?)[@:]", links, re.M):
        if name[1] in stale:
            subprocess.run(["ip", "link", "del", name[0]], capture_output=True)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _free_subnets() -> tuple[int, int]:
    """Two /24s of 10.77.0.0/16 that no interface here uses (mesh, database)."""
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    taken += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    free = [n for n in range(2, 254, 2) if f"10.77.{n}." not in taken and f"10.77.{n + 1}." not in taken]
    if not free:
        raise RuntimeError("no free /24 left in 10.77.0.0/16")
    n = random.choice(free)
    return n, n + 1


@dataclass
class Host:
    name: str
    ns: str
    address: str  # on the mesh network
    db_address: str | None  # on the database network (brokers only)
    veths: dict[str, str]  # link -> the bridge's end of this host's veth


class Network:
    """Broker hosts b1..bN, worker hosts w1..wN and client hosts c1..cN, made at once."""

    def __init__(self, brokers: int = 3, workers: int = 2, clients: int = 1) -> None:
        sweep()
        self.tag = uuid.uuid4().hex[:4]
        self.hosts: dict[str, Host] = {}
        self.bridges: list[str] = []
        self._lock = threading.Lock()
        try:
            self._make(brokers, workers, clients)
        except BaseException:
            self.close()
            raise

    def _make(self, brokers: int, workers: int, clients: int) -> None:
        mesh, db = _free_subnets()
        self.db_gateway = f"10.77.{db}.1"  # this machine, on the database network
        for link, address in (("mesh", None), ("db", f"{self.db_gateway}/24")):
            bridge = f"cd{self.tag}{link[0]}"
            _ip("link", "add", bridge, "type", "bridge")
            self.bridges.append(bridge)
            if address:
                _ip("addr", "add", address, "dev", bridge)
            _ip("link", "set", bridge, "up")
        names = [f"b{i}" for i in range(1, brokers + 1)]
        names += [f"w{i}" for i in range(1, workers + 1)] + [f"c{i}" for i in range(1, clients + 1)]
        for index, name in enumerate(names, start=10):
            ns = f"cdt{self.tag}-{os.getpid()}-{name}"
            _ip("netns", "add", ns)
            host = Host(name, ns, f"10.77.{mesh}.{index}", None, {})
            self.hosts[name] = host
            _ip("link", "set", "lo", "up", ns=ns)
            self._attach(host, "mesh", host.address)
            if name.startswith("b"):
                host.db_address = f"10.77.{db}.{index}"
                self._attach(host, "db", host.db_address)

    def _attach(self, host: Host, link: str, address: str) -> None:
        outer, inner = f"cd{self.tag}{host.name}{link[0]}", f"{link}0"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", host.ns)
        host.veths[link] = outer
        _ip("link", "set", outer, "master", f"cd{self.tag}{link[0]}", "up")
        _ip("addr", "add", f"{address}/24", "dev", inner, ns=host.ns)
        _ip("link", "set", inner, "up", ns=host.ns)

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every namespace, veth and bridge this network made (processes in it first)."""
        for host in self.hosts.values():
            for veth in host.veths.values():
                with contextlib.suppress(RuntimeError):
                    _ip("link", "del", veth)  # its peer in the namespace goes with it
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", host.ns)
        for bridge in self.bridges:
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", bridge)
        self.hosts, self.bridges = {}, []

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def names(self, role: str) -> list[str]:
        """The hosts of a role: "b" brokers, "w" workers, "c" clients."""
        return [n for n in self.hosts if n.startswith(role)]

    # -- partitions ------------------------------------------------------------------------

    def cut(self, name: str, link: str = "mesh") -> None:
        """Pull the host's cable on one network: everything it sends there is lost, silently."""
        with self._lock:
            _ip("link", "set", self.hosts[name].veths[link], "down")

    def heal(self, name: str, link: str = "mesh") -> None:
        with self._lock:
            _ip("link", "set", self.hosts[name].veths[link], "up")

    # -- running things in a host ----------------------------------------------------------

    def broker_options(self, name: str, port: int = 5555, pub: int = 5556) -> list[str]:
        """`conduit broker` options for a broker on host `name`: bound to all its interfaces,
        advertised at its mesh address (each host has ports of its own, so they can be fixed)."""
        address = self.hosts[name].address
        return [
            *("--bind", f"tcp://0.0.0.0:{port}", "--advertise", f"tcp://{address}:{port}"),
            *("--pub", f"tcp://0.0.0.0:{pub}", "--advertise-pub", f"tcp://{address}:{pub}"),
        ]

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        """`argv` run in the host (its pid is the program's: `ip netns exec` execs it)."""
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[name].ns, *argv], text=True, **kwargs)

    def run_in(self, name: str, fn: Callable[[], object]) -> None:
        """`fn()` in the host: a thread target (`Worker.run` makes its context as it starts)."""
        with self.enter(name):
            fn()

    @contextlib.contextmanager
    def enter(self, name: str) -> Iterator[None]:
        """The calling thread in the host's network until the block ends. Make ZeroMQ contexts
        (a Client, a Worker) inside: their I/O threads are born in the host and stay there."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        there = os.open(NETNS_DIR / self.hosts[name].ns, os.O_RDONLY)
        try:
            if libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.hosts[name].ns} failed")
            try:
                yield
            finally:
                libc.setns(home, CLONE_NEWNET)
        finally:
            os.close(there)
            os.close(home)
