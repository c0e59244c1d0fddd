"""The dashboard's pure parts: chart bins and SVG, payload previews, session and form tokens."""

from __future__ import annotations

import msgpack

from conduit.dashboard import charts
from conduit.dashboard.preview import HEX_LIMIT, preview
from conduit.dashboard.security import Guard


def test_bins_average_each_bin_and_leave_gaps() -> None:
    series = [(91.0, 2.0, 1.0), (93.0, 4.0, 3.0), (99.5, 10.0, 0.0), (40.0, 99.0, 99.0)]
    got = charts.bins(series, now=100.0, span=30.0, count=3)  # bins [70,80) [80,90) [90,100)
    assert got == [[], [], [16 / 3, 4 / 3]]
    assert charts.bins(series[:2], now=100.0, span=20.0, count=2) == [[], [3.0, 2.0]]
    svg = charts.sparkline([[], [1.0, 0.5], [2.0, 1.0]], ("in", "out"), "q <tasks>")
    assert (
        svg.count("<polygon") == svg.count("<polyline") == 1
        and "max 2.0/s" in svg
        and "q &lt;tasks&gt;" in svg
    )
    assert "no readings yet" in charts.sparkline([[], []], ("in", "out"), "q")
    lone = charts.sparkline([[3.0, 1.0], [], []], ("in", "out"), "q")
    assert lone.count("<circle") == 2 and "<polyline" not in lone
    assert ">-</text>" in charts.unmeasured("latency")


def test_preview_shows_every_reading_that_works() -> None:
    packed = preview(msgpack.packb(["send_email", ["a@b.c"], {"subject": b"hi", "n": 2}]))
    assert packed.msgpack is not None and '"subject": "hi"' in packed.msgpack
    assert packed.json is None and packed.hex.startswith("00000000  93 aa")
    as_json = preview(b'{"to": "a@b.c"}')
    assert (
        as_json.msgpack is None
        and as_json.json == '{\n  "to": "a@b.c"\n}'
        and as_json.text == '{"to": "a@b.c"}'
    )
    binary = preview(bytes(range(256)) * 20)
    assert (binary.msgpack, binary.json, binary.text) == (None, None, None)
    assert binary.size == 5120 and binary.hex.endswith("(5,120 bytes in all)")
    assert len(binary.hex.splitlines()) == HEX_LIMIT // 16 + 1
    assert preview(b"").hex == "" and preview(b"").text == ""


def test_sessions_and_form_tokens_are_signed_with_the_token() -> None:
    guard, other = Guard("one-token"), Guard("another-token")
    cookie = guard.cookie_for("s1")
    assert guard.session_of(cookie) == "s1"
    assert other.session_of(cookie) is None  # a restart with a new token ends every session
    assert guard.session_of("s1." + "0" * 64) is None and guard.session_of(None) is None
    assert guard.session_of("s2" + cookie[2:]) is None  # the id is what is signed
    assert guard.csrf_for("s1") != guard.csrf_for("s2") and len(guard.csrf_for("s1")) == 32
    assert guard.csrf_for("s1") != other.csrf_for("s1") and guard.csrf_for(None) == ""


def test_any_text_a_request_carries_is_compared_without_error() -> None:
    """Non-ASCII tokens, cookies and form fields are refused, not a 500 (compare_digest raises on them)."""
    guard = Guard("one-token")
    assert not guard.token_matches("é-token")
    assert guard.session_of("s.é") is None
    assert guard.token_matches("one-token")


def test_a_payload_nested_past_reading_previews_as_hex() -> None:
    deep = preview(b"\x91" * 5000 + b"\xc0")  # msgpack arrays inside arrays, 5,000 deep
    assert deep.msgpack is None and deep.hex
    assert preview(b"[" * 100_000).json is None  # the same in JSON
