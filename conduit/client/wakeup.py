"""A wake-up that other threads give the worker's loop: a self-pipe its zmq poll watches.

Rule: `set` writes a byte only when none is pending, since a write per finished task would cost
more than the task; `drain` clears the pending flag only *after* reading the pipe. Cleared
before the read, a `set` landing between the two writes a byte that the read swallows while the
flag stays set, and no thread writes again: the loop then hears of finished handlers only on its
poll timeout, for good. Cleared after, a `set` racing the read either finds the flag still set
(its item is collected by the caller right after `drain`) or writes a byte the next poll sees.
"""

from __future__ import annotations

import contextlib
import os


class Wakeup:
    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()  # `fd` is what the loop polls
        os.set_blocking(self._write_fd, False)
        self._pending = False

    def set(self) -> None:
        """From any thread: wake the loop (once until it next drains)."""
        if not self._pending:
            self._pending = True
            with contextlib.suppress(BlockingIOError):  # full: the loop will wake anyway
                os.write(self._write_fd, b"!")

    def drain(self) -> None:
        """From the loop, once its poll found `fd` readable; collect what woke it afterwards."""
        os.read(self.fd, 65536)
        self._pending = False

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write_fd)
