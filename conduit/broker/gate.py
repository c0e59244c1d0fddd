"""The broker's ZAP handler: which CURVE clients may connect, from a folder of public key files.

libzmq asks this thread (ZAP, RFC 27) about every CURVE handshake on the broker's sockets, once a
connection, never a message. A key in the folder is let in. Any other is answered 300, a
temporary failure: libzmq sends the peer no error and no READY, so the peer gets nothing, and
the connection ends at once or when its handshake interval runs out (3 s, conduit.curve). The
peer's ZeroMQ then reconnects by itself, so a key added to the folder later gets in without a
restart of either side (after a 400, libzmq gives that connection up for good, and a gossip SUB
would never hear that broker again). Each refused key is logged once.

The folder is looked at every second, and again whenever a key not allowed comes (its peer
retries every few seconds): a change to its `*.key` files (names, sizes, mtimes) reloads it. A
key removed is refused from its next connection; connections already made stay until they drop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from conduit.curve import PUBLIC_SUFFIX, SECRET_SUFFIX, read_public
from conduit.errors import ConfigError
from conduit.logs import log

logger = logging.getLogger("conduit.broker")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
SCAN_EVERY = 1.0  # seconds between looks at the allow-list folder
MAX_LOGGED = 1000  # refused keys logged one by one; beyond, one line says the rest are not


class AllowList:
    """The allowed keys, reloaded when the folder changes. One owner thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keys: frozenset[bytes] = frozenset()
        self._signature: object = None
        self._scanned = -float("inf")
        self._refused: set[bytes] = set()
        self._bad: set[tuple[str, int]] = set()  # files logged as unreadable, by name and mtime
        self._scan()

    def refresh(self) -> None:
        if time.monotonic() - self._scanned >= SCAN_EVERY:
            self._scan()

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        try:
            entries = sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_size)
                for e in os.scandir(self.folder)
                if e.name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)) and e.is_file()
            )
        except OSError as exc:
            if self._signature is not OSError:
                log(logger, "error", "curve_allow_unreadable", folder=self.folder, error=exc.strerror)
                self._signature = OSError  # keep the keys loaded last; log this once
            return
        if entries == self._signature:
            return
        self._signature = entries
        keys = set()
        for name, mtime, _ in entries:
            try:
                if name.endswith(SECRET_SUFFIX):
                    raise ConfigError(f"a secret key in the allow-list folder: move {name} out (not read)")
                keys.add(read_public(self.folder / name))
            except ConfigError as exc:
                if (name, mtime) not in self._bad:
                    self._bad.add((name, mtime))
                    log(logger, "warning", "curve_key_skipped", error=str(exc))
        self.keys = frozenset(keys)
        log(logger, "info", "curve_allow_loaded", folder=self.folder, keys=len(self.keys))

    def allows(self, key: bytes, address: str) -> bool:
        """`key` is Z85. A refused key is logged the first time only."""
        if key not in self.keys:  # it may have just been added: a listing and a stat a file, cheap
            self._scan()
        if key in self.keys:
            return True
        if key not in self._refused and len(self._refused) <= MAX_LOGGED:
            self._refused.add(key)
            if len(self._refused) > MAX_LOGGED:
                log(logger, "warning", "curve_refused_many", hint=f"over {MAX_LOGGED} keys: no more logged")
            else:
                log(logger, "warning", "curve_refused", key=key.decode(), address=address)
        return False


class Gate(threading.Thread):
    """Answers ZAP requests on its own socket until stopped; bound before the broker's sockets."""

    def __init__(self, ctx: zmq.Context[Any], folder: Path) -> None:
        super().__init__(name="zap", daemon=True)
        self.allow = AllowList(folder)
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._halt = threading.Event()
        self.start()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if self._sock.poll(200):  # a stop waits at most this long
                    frames = self._sock.recv_multipart()
                    try:
                        reply = self._answer(frames)
                    except Exception as exc:  # never die: with ZAP enforced, nobody would get in
                        log(logger, "error", "zap_failed", error=f"{type(exc).__name__}: {exc}")
                        reply = [*frames[:2], b"500", b"internal error", b"", b""]
                    self._sock.send_multipart(reply)
                self.allow.refresh()
        finally:
            self._sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """[version, id, domain, address, identity, mechanism, credentials...] in; [version, id,
        status, text, user id, metadata] out. Only CURVE with an allowed key passes."""
        version, rid = [*frames, b"", b""][:2]
        if len(frames) < 7 or frames[5] != b"CURVE" or len(frames[6]) != 32:
            return [version, rid, b"400", b"CURVE only", b"", b""]
        key = z85.encode(frames[6])
        if self.allow.allows(key, frames[3].decode(errors="replace")):
            return [version, rid, b"200", b"OK", key, b""]
        return [version, rid, b"300", b"key not allowed", b"", b""]
