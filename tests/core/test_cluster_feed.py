"""The change feed's rules: when a relay reads everything, where its cursor moves, and how
holder rows apply."""

from __future__ import annotations

from aegis_edge_core.cluster import Holder
from aegis_edge_core.cluster_feed import (
    FULL_RESYNC_EVERY,
    FeedCursor,
    advance,
    apply_holders,
    read_from,
)


def holder(node_id: str, relay_id: str, generation: int = 1) -> Holder:
    return Holder(node_id=node_id, relay_id=relay_id, generation=generation)


def test_the_first_read_is_full_then_the_feed_then_full_again_after_a_while() -> None:
    assert read_from(FeedCursor(), 100.0) is None
    cursor = advance(FeedCursor(), seqs=[3, 9, 4], head=11, full=True, now=100.0)
    # the highest number read, not the head: 10 and 11 may be drawn but not committed yet
    assert cursor == FeedCursor(seq=9, full_at=100.0)
    assert read_from(cursor, 100.0 + FULL_RESYNC_EVERY - 1) == 9
    assert read_from(cursor, 100.0 + FULL_RESYNC_EVERY) is None
    assert read_from(cursor, 50.0) is None  # the clock went back: trust nothing


def test_a_feed_read_moves_the_cursor_only_forward() -> None:
    cursor = FeedCursor(seq=9, full_at=100.0)
    assert advance(cursor, seqs=[], head=9, full=False, now=101.0) == cursor
    assert advance(cursor, seqs=[12, 10], head=14, full=False, now=101.0).seq == 12
    assert advance(cursor, seqs=[], head=14, full=False, now=101.0).seq == 9


def test_a_sequence_behind_the_cursor_forces_a_full_read() -> None:
    cursor = FeedCursor(seq=500, full_at=100.0)
    restored = advance(cursor, seqs=[3], head=7, full=False, now=101.0)
    assert restored == FeedCursor()
    assert read_from(restored, 101.0) is None
    # an empty database: the full read leaves the cursor at 0, so the next read is the feed
    empty = advance(restored, seqs=[], head=0, full=True, now=102.0)
    assert empty == FeedCursor(seq=0, full_at=102.0)
    assert read_from(empty, 103.0) == 0


def test_holder_rows_replace_and_released_rows_drop() -> None:
    current = {"n1": holder("n1", "a"), "n2": holder("n2", "b")}
    after = apply_holders(
        current, [holder("n1", "c", 2), holder("n2", ""), holder("n3", "a")], full=False
    )
    assert after == {"n1": holder("n1", "c", 2), "n3": holder("n3", "a")}
    assert current["n2"] == holder("n2", "b")  # the caller's map is left alone


def test_a_full_read_is_everything_there_is() -> None:
    current = {"n1": holder("n1", "a"), "n2": holder("n2", "b")}
    assert apply_holders(current, [holder("n2", "b", 3)], full=True) == {"n2": holder("n2", "b", 3)}
