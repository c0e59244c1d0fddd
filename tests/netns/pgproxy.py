"""A TCP proxy in front of PostgreSQL, so hosts in namespaces reach it as a remote server: on an
address of the database network, forwarding to the local server (TCP, or the embedded server's
Unix socket). It can also act as a bad network between one host and the database:

- `cut(source)`: nothing moves either way for that host's connections, and new ones wait before
  reaching the server (a partition: TCP retransmits in silence, nothing is refused);
- `hold(source, direction)`: one way only ("up", to the server, or "down", its replies), as when
  every packet one way is lost and TCP keeps resending;
- `delay(source, direction, seconds)`: each chunk that way waits that long first;
- `heal(source)`: all of it lifted; held bytes then flow in order, as after a real partition.

It runs its own asyncio loop in a thread; the controls may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg.conninfo import conninfo_to_dict, make_conninfo

DIRECTIONS = ("up", "down")
CHUNK = 65536


@dataclass
class _Rules:
    """One source address's troubles: an open gate per direction, a delay per direction."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))


class PgProxy:
    def __init__(self, dsn: str, listen: str) -> None:
        """Forward connections on `listen` (an address of this machine) to the server `dsn` names."""
        params = conninfo_to_dict(dsn)
        self._dsn = dsn
        host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._upstream = (host, port)
        self.listen = listen
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._rules: dict[str, _Rules] = defaultdict(_Rules)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def dsn(self) -> str:
        """The server's DSN as a host on the database network reaches it: through this proxy."""
        return make_conninfo(self._dsn, host=self.listen, port=str(self.port))

    def start(self) -> PgProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the PostgreSQL proxy did not start")
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(10)

    # -- controls (any thread) ---------------------------------------------------------------

    def cut(self, source: str) -> None:
        self._control(self._set_gates, source, DIRECTIONS, False)

    def hold(self, source: str, direction: str) -> None:
        assert direction in DIRECTIONS, direction
        self._control(self._set_gates, source, (direction,), False)

    def delay(self, source: str, direction: str, seconds: float) -> None:
        assert direction in DIRECTIONS, direction
        self._control(self._set_delay, source, direction, seconds)

    def heal(self, source: str) -> None:
        self._control(self._set_gates, source, DIRECTIONS, True)
        for direction in DIRECTIONS:
            self._control(self._set_delay, source, direction, 0.0)

    def _control(self, fn: Callable[..., None], *args: object) -> None:
        done = threading.Event()

        def apply() -> None:
            fn(*args)
            done.set()

        self._loop.call_soon_threadsafe(apply)
        if not done.wait(5):
            raise RuntimeError("the PostgreSQL proxy did not answer")

    # -- the loop ----------------------------------------------------------------------------

    def _gate(self, source: str, direction: str) -> asyncio.Event:
        gates = self._rules[source].gates
        if direction not in gates:
            gates[direction] = asyncio.Event()
            gates[direction].set()
        return gates[direction]

    def _set_gates(self, source: str, directions: tuple[str, ...], open_: bool) -> None:
        for direction in directions:
            gate = self._gate(source, direction)
            if open_:
                gate.set()
            else:
                gate.clear()

    def _set_delay(self, source: str, direction: str, seconds: float) -> None:
        self._rules[source].delays[direction] = seconds

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.listen, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        source = str(writer.get_extra_info("peername")[0])
        try:
            for direction in DIRECTIONS:  # a host cut off does not reach the server at all
                await self._gate(source, direction).wait()
            if self._unix:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            try:
                pumps = [
                    asyncio.ensure_future(self._pump(reader, up_writer, source, "up")),
                    asyncio.ensure_future(self._pump(up_reader, writer, source, "down")),
                ]
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in pumps:
                    pump.cancel()
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str, direction: str
    ) -> None:
        rules = self._rules[source]
        gate = self._gate(source, direction)
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await gate.wait()
                if rules.delays[direction]:
                    await asyncio.sleep(rules.delays[direction])
                writer.write(data)
                await writer.drain()
