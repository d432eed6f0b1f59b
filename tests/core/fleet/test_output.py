"""Live output bounds: the per-run gate, the per-watcher buffer and line assembly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_edge_core.fleet.output import (
    LineAssembler,
    OutputGate,
    OutputLimits,
    WatcherBuffer,
    dropped_marker,
    host_label,
)
from aegis_edge_core.ratelimit import Limit

SMALL = OutputLimits(
    target_bytes=Limit(burst=100, rate=10),
    target_lines=Limit(burst=5, rate=1),
    run_bytes=Limit(burst=150, rate=20),
    run_lines=Limit(burst=8, rate=2),
    max_line_bytes=40,
)


def test_normal_output_passes_untouched() -> None:
    gate = OutputGate(now=0.0)
    got = gate.admit("n1", 0.0, stdout=b"hello\nworld\n", stderr=b"warn\n")
    assert got is not None
    assert (got.stdout, got.stderr, got.dropped_before) == (b"hello\nworld\n", b"warn\n", 0)
    assert gate.finish("n1") == 0


def test_flood_is_cut_to_a_prefix_and_counted() -> None:
    gate = OutputGate(SMALL, now=0.0)
    got = gate.admit("n1", 0.0, stdout=b"y\n" * 100)
    assert got is not None
    assert got.stdout == b"y\n" * 5  # the target's line burst
    assert got.dropped_before == 190  # this chunk's rest is reported with it
    # Nothing refilled: the next chunk is dropped whole and waits in the count.
    assert gate.admit("n1", 0.0, stdout=b"more\n") is None
    # A second later one line's worth of tokens is back; the gap is reported with it.
    got = gate.admit("n1", 1.0, stdout=b"later\n")
    assert got is not None and got.stdout == b"later\n" and got.dropped_before == 5
    assert gate.finish("n1") == 0
    assert (gate.forwarded_bytes, gate.dropped_bytes) == (16, 195)


def test_run_budget_is_shared_by_targets() -> None:
    gate = OutputGate(SMALL, now=0.0)
    a = gate.admit("a", 0.0, stdout=b"line\n" * 5)
    b = gate.admit("b", 0.0, stdout=b"line\n" * 5)
    assert a is not None and a.stdout == b"line\n" * 5
    assert b is not None and b.stdout == b"line\n" * 3  # the run's 8 lines are spent
    assert b.dropped_before == 10


def test_a_long_line_is_cut_into_segments() -> None:
    gate = OutputGate(SMALL, now=0.0)
    got = gate.admit("n1", 0.0, stdout=b"x" * 90)  # no newline, 40-byte segments
    assert got is not None and got.stdout == b"x" * 90 and got.dropped_before == 0


def test_drops_unreported_at_the_end_come_from_finish() -> None:
    gate = OutputGate(SMALL, now=0.0)
    assert gate.admit("n1", 0.0, stdout=b"a\n" * 5) is not None
    assert gate.admit("n1", 0.0, stdout=b"b\n" * 3) is None
    assert gate.finish("n1") == 6
    assert gate.finish("n1") == 0  # forgotten


def test_bytes_lost_on_the_way_are_reported_like_the_gates_own() -> None:
    gate = OutputGate(SMALL, now=0.0)
    got = gate.admit("n1", 0.0, stdout=b"kept\n", lost_before=300)
    assert got is not None and got.stdout == b"kept\n" and got.dropped_before == 300
    # lost with nothing forwarded: it waits for the next item, or for the end
    assert gate.admit("n1", 0.0, lost_before=7) is None
    assert gate.finish("n1") == 7
    assert gate.dropped_bytes == 307
    with pytest.raises(ValueError, match="negative"):
        gate.admit("n1", 0.0, stdout=b"x\n", lost_before=-1)


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        OutputLimits(target_bytes=Limit(burst=10, rate=1), max_line_bytes=100)
    with pytest.raises(ValueError, match="max_line_bytes"):
        OutputLimits(max_line_bytes=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.binary(max_size=120),
            st.binary(max_size=60),
            st.floats(min_value=0, max_value=2),
        ),
        max_size=40,
    )
)
def test_every_byte_is_forwarded_or_reported(chunks: list[tuple[str, bytes, bytes, float]]) -> None:
    """Per target: forwarded bytes are a prefix of each chunk, in order, and forwarded +
    reported dropped (with chunks and at finish) = bytes received."""
    gate = OutputGate(SMALL, now=0.0)
    now = 0.0
    received: dict[str, int] = {}
    accounted: dict[str, int] = {}
    for node, out, err, step in chunks:
        now += step
        received[node] = received.get(node, 0) + len(out) + len(err)
        got = gate.admit(node, now, stdout=out, stderr=err)
        if got is not None:
            assert out.startswith(got.stdout) and err.startswith(got.stderr)
            assert got.stdout or got.stderr
            accounted[node] = (
                accounted.get(node, 0) + len(got.stdout) + len(got.stderr) + got.dropped_before
            )
    for node in received:
        accounted[node] = accounted.get(node, 0) + gate.finish(node)
    assert accounted == received
    assert gate.forwarded_bytes + gate.dropped_bytes == sum(received.values())


def test_watcher_buffer_drops_output_not_control() -> None:
    buf: WatcherBuffer[str] = WatcherBuffer(max_bytes=10)
    assert buf.push_output("n1", "o1", size=6)
    assert not buf.push_output("n1", "o2", size=6)  # 12 > 10: dropped for this watcher
    buf.push_control("c1")
    assert buf.push_output("n2", "o3", size=4)  # another target still fits
    buf.push_control("done-n1", node_id="n1")  # a marker for n1's loss goes first
    got = [buf.pop() for _ in range(len(buf))]
    assert [(d.item, d.node_id, d.dropped_before, d.output) for d in got if d] == [
        ("o1", "n1", 0, True),
        ("c1", None, 0, False),
        ("o3", "n2", 0, True),
        (None, "n1", 6, True),
        ("done-n1", "n1", 0, False),
    ]
    assert buf.pop() is None and buf.waiting_bytes == 0 and buf.dropped_bytes == 6


def test_watcher_reports_a_gap_with_the_next_output() -> None:
    buf: WatcherBuffer[str] = WatcherBuffer(max_bytes=10)
    assert buf.push_output("n1", "o1", size=10)
    assert not buf.push_output("n1", "o2", size=5, dropped_before=3)  # 3 lost at the gate
    assert buf.pop() is not None  # the watcher caught up
    buf.note_dropped("n1", 2)
    assert buf.push_output("n1", "o3", size=4, dropped_before=1)
    got = buf.pop()
    assert got is not None and got.item == "o3" and got.dropped_before == 3 + 5 + 2 + 1


def test_watcher_memory_is_bounded_under_a_flood() -> None:
    buf: WatcherBuffer[bytes] = WatcherBuffer(max_bytes=1000)
    for _ in range(10_000):
        buf.push_output("n1", b"x" * 100, size=100)
    assert len(buf) == 10 and buf.waiting_bytes == 1000 and buf.dropped_bytes == 999_000


def test_line_assembler() -> None:
    lines = LineAssembler(max_line_bytes=8)
    assert lines.feed("n1", "stdout", b"one\ntw") == ["one"]
    assert lines.feed("n2", "stdout", b"other\n") == ["other"]
    assert lines.feed("n1", "stderr", b"err\r\n") == ["err"]
    assert lines.feed("n1", "stdout", b"o\n") == ["two"]
    assert lines.feed("n1", "stdout", b"abcdefghij") == ["abcdefgh"]  # cut, not held
    assert lines.feed("n1", "stdout", b"\xff\n") == ["ij\ufffd"]
    assert lines.feed("n1", "stdout", b"tail") == []
    assert lines.flush("n1") == [("stdout", "tail")]
    assert lines.flush("n1") == []


def test_marker_and_host_label() -> None:
    assert dropped_marker(1234) == "[1234 bytes of output dropped]"
    assert host_label("n-1", {"hostname": "web-1"}) == "web-1"
    assert host_label("n-1", {}) == "n-1"
    assert host_label("n-1", {"hostname": "has space"}) == "n-1"
    assert host_label("n-1", {"hostname": "x" * 65}) == "n-1"
