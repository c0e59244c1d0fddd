"""Which queues are paused, as one broker knows it, and when to read the set again.

Pausing is durable: `paused_queues` in the database, changed by `Store.pause` and `resume` (from
the CLI, or a PAUSE or RESUME at any broker), each change sending NOTIFY '!paused'. A broker reads
the set once a second (on its keeper connection) and at once when its listener hears the notice,
so every broker stops delivering a paused queue within about a second. A read that fails keeps
the set last known: a broker cut off from its database goes on pausing what was paused. Pure
bookkeeping, like the core that owns it: the time comes in with each call.
"""

from __future__ import annotations

from dataclasses import dataclass

PAUSED_NOTICE = "!paused"  # the NOTIFY payload of a change (no queue name starts with '!')
READ_EVERY = 1.0  # seconds between reads of the set when no notice came


@dataclass
class Pauses:
    queues: frozenset[str] = frozenset()
    _reading: bool = False  # a read is in flight
    _stale: bool = False  # a notice came since the read in flight (or the last one) started
    _next_read: float = 0.0

    def due(self, now: float) -> bool:
        """Whether to read the set now; if so, a read is taken to be in flight until `read`."""
        if self._reading or not (self._stale or now >= self._next_read):
            return False
        self._reading, self._stale, self._next_read = True, False, now + READ_EVERY
        return True

    def noticed(self) -> None:
        """The set changed in the database: read it again, after the read in flight if any (that
        one may have started before the change committed)."""
        self._stale = True

    def read(self, queues: frozenset[str] | None) -> tuple[frozenset[str], frozenset[str]]:
        """A scheduled read came back (None: it failed, and the set stays as it was)."""
        self._reading = False
        return self.apply(queues)

    def apply(self, queues: frozenset[str] | None) -> tuple[frozenset[str], frozenset[str]]:
        """Take a set read from the database; returns the queues paused and resumed by it."""
        if queues is None:
            return frozenset(), frozenset()
        paused, resumed = queues - self.queues, self.queues - queues
        self.queues = queues
        return paused, resumed
