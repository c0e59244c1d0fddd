"""The broker's tally, its histograms, STATS and COMPLETE's and FAIL's `elapsed`, in the pure core."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_core import CLIENT, WORKER, drain, make_core, of, poll, request, sent, task

from conduit.broker import core
from conduit.broker.events import Leased, Shutdown, Tallied, Written
from conduit.broker.writes import WriteResult
from conduit.histogram import EXPORTED_SECONDS, SECONDS, Histogram, Recent
from conduit.task import Outcome, Submitted
from conduit.wire import Command, ErrorCode, ProtocolError, decode, encode, parse_elapsed, report_body


def test_exported_bounds_are_some_of_the_fine_ones() -> None:
    assert set(EXPORTED_SECONDS) <= set(SECONDS)
    assert list(SECONDS) == sorted(SECONDS)


@given(st.lists(st.floats(min_value=0, max_value=5000), min_size=1, max_size=300))
def test_quantiles_fall_in_the_bucket_of_the_true_value(values: list[float]) -> None:
    h = Histogram()
    h.add_all(values)
    assert h.count == len(values)
    assert h.sum == pytest.approx(sum(values))
    ordered = sorted(values)
    for q in (0.5, 0.99):
        true = ordered[max(0, -(-int(q * len(values) * 1000) // 1000) - 1)]
        got = h.quantile(q)
        assert got is not None
        low = max([b for b in SECONDS if b < true], default=0.0)
        high = min([b for b in SECONDS if b >= true], default=SECONDS[-1])
        assert low <= got <= max(high, SECONDS[-1] if true > SECONDS[-1] else high)
    cumulative = h.cumulative(EXPORTED_SECONDS)
    assert [n for _, n in cumulative] == sorted(n for _, n in cumulative)
    for bound, n in cumulative:
        assert n == sum(1 for v in values if v <= bound)


def test_a_weighted_add_counts_many_tasks_at_once() -> None:
    h = Histogram()
    h.add(0.004, 500)
    h.add(0.2, 5)
    assert h.count == 505 and h.sum == pytest.approx(2 + 1)
    assert 0.003 <= (h.quantile(0.5) or 0) <= 0.005
    assert 0.15 <= (h.quantile(0.999) or 0) <= 0.2
    assert Histogram().quantile(0.5) is None


def test_recent_keeps_the_last_minute_only() -> None:
    r = Recent(span=60, slots=6)
    r.add(5.0, 1.0, 10)
    r.add(35.0, 2.0, 10)
    assert r.merged(40.0).count == 20
    assert r.merged(64.0).count == 10  # the slice of 0-10 s is past
    r.add(125.0, 3.0)  # its slice (120-130) takes the place of 0-10 s
    assert r.merged(125.0).count == 1  # 35 s is more than a minute ago


def stats(c: core.Core, now: float = 0.0) -> dict[str, object]:
    ((command, body),) = sent(request(c, CLIENT, "STATS", now, rid=9))
    assert command == "BROKER_STATS" and body["rid"] == 9
    return body


def test_stats_of_a_fresh_broker() -> None:
    body = stats(make_core())
    assert body["broker"] == "b1" and body["epoch"] == 1 and body["lease_valid"] is True
    assert body["queue"] == [] and body["latency_p50"] == []


def test_stats_count_submits_deliveries_and_what_commits_ended() -> None:
    c = make_core()
    c.tally.clock_offset = 1_000_000.0  # wall clock = events' clock + this
    drain(c)  # a poll waits on q
    actions = request(c, CLIENT, "SUBMIT", 1.0, rid=7, queue="q", payload=[b"a", b"b"])
    (write,) = of(actions, core.Write)
    result = WriteResult([[Submitted(41, True, True), Submitted(42, False, False)]], [])
    c.handle(Written(write.batch, result, None, 1.004))  # 41 sync-matched, 42 an idempotent repeat
    # Three tasks read from the database, due 2 s and 0.5 s before the poll that takes them.
    due = datetime.fromtimestamp(1_000_000.0 + 3.0, UTC)
    tasks = [task(50)._replace(run_at=due), task(51)._replace(run_at=due), task(52)]
    tasks[2] = tasks[2]._replace(run_at=due + timedelta(seconds=1.5))
    poll(c, 5.0, rid=2, max=10)
    c.handle(Leased("q", tasks, None, 5.0))
    body = stats(c, 5.0)
    assert body["queue"] == ["q"]
    assert (body["submitted"], body["delivered"], body["buffered"], body["polls"]) == ([1], [4], [0], [0])
    p50, p99 = body["latency_p50"][0], body["latency_p99"][0]  # type: ignore[index]
    assert p50 == pytest.approx(0.5) and 1.5 < p99 <= 2.0  # of 0.004 (sync matched), 0.5, 2 and 2 s
    # A COMPLETE of two (one refused), then a FAIL that kills: counted once their commits say so.
    (first,) = of(
        request(c, WORKER, "COMPLETE", 5.1, rid=3, id=[50, 51], attempt=[1, 9], elapsed=[0.5, 7]), core.Write
    )
    request(c, WORKER, "FAIL", 5.1, rid=4, id=[52], attempt=[1], error=["x"], retry=False)
    completed = WriteResult([], [[Outcome.OK, Outcome.STALE]], {"completed": {"q": 1}})
    (second,) = of(c.handle(Written(first.batch, completed, None, 5.2)), core.Write)
    c.handle(
        Written(
            second.batch, WriteResult([], [[Outcome.OK]], {"failed": {"q": 1}, "dead": {"q": 1}}), None, 5.3
        )
    )
    c.handle(Tallied({"failed": {"q": 2}}))  # the reaper's
    body = stats(c, 5.2)
    assert (body["completed"], body["failed"], body["dead"]) == ([1], [3], [1])
    assert c.tally.refused == {"stale": 1, "finished": 0, "cancelled": 0, "unknown": 0}
    assert c.tally.run_seconds.count == 1 and c.tally.run_seconds.sum == 0.5  # the accepted row's
    assert c.tally.commit_size.count == 3 and c.tally.commit_size.sum == 3  # a request each
    assert c.tally.queues["q"].latency.count == 4


def test_a_stopped_broker_refuses_stats_as_it_does_workers() -> None:
    c = make_core()
    c.handle(Shutdown(0.0))
    assert c.stopped
    ((command, body),) = sent(request(c, CLIENT, "STATS", 0.2, rid=9))
    assert command == "ERROR" and body["code"] == "shutting_down"


def test_elapsed_is_optional_and_checked() -> None:
    def msg(**body: object) -> object:
        return decode(encode(Command.COMPLETE, {"rid": 1, "id": [1, 2], "attempt": [1, 1], **body}))

    assert parse_elapsed(msg(), 2) is None  # type: ignore[arg-type]
    assert parse_elapsed(msg(elapsed=[0, None]), 2) == [0.0, None]  # type: ignore[arg-type]
    for bad in ([1.0], [-1.0, 1.0], ["1", 1.0], [True, 1.0], 1.5, [float("nan"), 1.0], [1e12, 0]):
        with pytest.raises(ProtocolError) as caught:
            parse_elapsed(msg(elapsed=bad), 2)  # type: ignore[arg-type]
        assert caught.value.code is ErrorCode.BAD_REQUEST and "elapsed" in str(caught.value)
    assert report_body(Command.COMPLETE, [(1, 1, None, 0.25)]) == {
        "id": (1,),
        "attempt": (1,),
        "elapsed": (0.25,),
    }
    failed = report_body(Command.FAIL, [(1, 1, "e", True, 2.0)])
    assert failed["elapsed"] == (2.0,) and failed["retry"] is True


def test_a_bad_elapsed_refuses_the_report_and_writes_nothing() -> None:
    c = make_core()
    actions = request(c, WORKER, "COMPLETE", 0.0, rid=3, id=[1], attempt=[1], elapsed=[-2])
    ((command, body),) = sent(actions)
    assert command == "ERROR" and body["code"] == "bad_request" and not of(actions, core.Write)
