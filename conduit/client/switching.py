"""Which broker a worker talks to, and leaving one (docs/PROTOCOL.md §11): the Loop's broker
choice and failover, apart from its bookkeeping of tasks and reports (conduit.client.loop).

With nowhere else to go, a worker that fails over keeps polling its only broker, after pauses
that grow (0.5, 1, then 2 s: two liveness intervals at most, so a broker back is found soon),
and logs the outage once a minute rather than at every try.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from conduit.logs import log

if TYPE_CHECKING:
    from conduit.client.loop import Loop

logger = logging.getLogger("conduit.worker")
ALONE_BACKOFF = (0.5, 1.0, 2.0)  # pauses before polling the only broker again after failovers


def check_brokers(loop: Loop) -> None:
    """Leave a broker we wait on that went quiet or dropped us (§11): the current one by
    failing over, another (reports sent before we moved) by sending its rows again. Leave the
    current one too when it is down while we hold tasks, so heartbeats go elsewhere at once."""
    now = time.monotonic()
    for endpoint in awaited(loop):
        if endpoint in loop.links and (why := loop.links[endpoint].gone(now)):
            log(logger, "warning", "broker_gone", endpoint=endpoint, why=why)
            give_up(loop, endpoint)
    if loop.poll_rid is not None and now > loop.poll_deadline:
        failover(loop)
    elif (
        loop.link(loop.current).down
        and (loop.running or loop.prefetched or loop.pending_reports())
        and any(e != loop.current for e in loop.mesh.rank([]))
    ):
        log(logger, "warning", "broker_gone", endpoint=loop.current, why="its connection dropped")
        failover(loop)


def awaited(loop: Loop) -> set[str]:
    """The brokers something sent awaits an answer from: their silence counts."""
    endpoints = {u[3] for u in loop.unacked.values()}
    if loop.poll_rid is not None:
        endpoints.add(loop.current)
    if loop.heartbeats:
        endpoints.add(loop.heartbeat_to)
    return endpoints


def give_up(loop: Loop, endpoint: str) -> None:
    if endpoint == loop.current:
        failover(loop)
        return
    close_link(loop, endpoint)
    for rid in [rid for rid, u in loop.unacked.items() if u[3] == endpoint]:
        loop.requeue(rid)
    if loop.heartbeat_to == endpoint:
        loop.heartbeats = {}
        loop.next_heartbeat = 0.0


def close_link(loop: Loop, endpoint: str) -> None:
    """Drop its socket, so nothing queued for it is sent later, and rank it last for now."""
    link = loop.links.pop(endpoint, None)
    if link is not None:
        loop.poller.unregister(link.sock)
        link.close()
    loop.mesh.suspect(endpoint)


def choose_broker(loop: Loop) -> None:
    """Deepest first: while polls bring tasks, stay (a busy worker talks to one broker); after
    an empty poll, go where gossip shows the most buffered for our queues, or, with nothing
    buffered anywhere, to the broker with the fewest waiting polls, so idle workers spread."""
    if not loop.last_poll_empty:
        return
    loop.mesh.update()
    ranked = loop.mesh.rank(loop.queues, avoid=loop.current)
    if not loop.mesh.live():  # no gossip yet: go round the configured list
        i = ranked.index(loop.current) if loop.current in ranked else -1
        ranked = ranked[i + 1 :] + ranked[: i + 1]
    loop.current = ranked[0]


def failover(loop: Loop) -> None:
    """The broker is gone, cut off or refusing: drop its socket (nothing queued for it is sent
    later), move to the next broker, and send everything unacknowledged again there (reports
    are fenced, so a repeat is harmless; task leases are renewed through any broker)."""
    alone = len(loop.mesh.rank([])) <= 1
    if alone:  # nowhere else to go: try it again after a pause that grows, logged once a minute
        pause = ALONE_BACKOFF[min(loop.alone_failovers, len(ALONE_BACKOFF) - 1)]
        loop.alone_failovers += 1
        loop.poll_after = time.monotonic() + pause
        loop.outage.failed("failover", "warning", endpoint=loop.current, retry_in_s=pause)
    else:
        log(logger, "warning", "failover", endpoint=loop.current)
    close_link(loop, loop.current)
    loop.poll_rid = None
    loop.heartbeats = {}  # its answer would come on the socket just closed
    loop.next_heartbeat = 0.0  # keep the task leases alive through the next broker at once
    loop.last_poll_empty = True
    choose_broker(loop)  # away from this broker, at once: reports and heartbeats follow
    loop.last_poll_empty = False
    if not alone:
        time.sleep(0.1)
    for rid in list(loop.unacked):
        loop.requeue(rid)
