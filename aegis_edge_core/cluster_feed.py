"""How a relay follows the cluster's node and holder rows: by change feed, not a full re-read.

Every change another relay must learn of (a node enrolled, revoked, re-keyed, re-tagged; a
stream held, released, or its status changed) stamps its row with the next number of one
store-wide sequence. Each sync a relay reads only the rows stamped after the last number it
saw, so an idle cluster's sync reads nothing however large the fleet. The store makes the
numbers commit in order, so "every row above n" never skips a change committed late under a
smaller number.

A full read stays as the safety net: at start, every :data:`FULL_RESYNC_EVERY` seconds, and
whenever the sequence is found behind what this relay already saw (the database was
restored, or recreated). Applying is idempotent -- each row read is that row as it is now --
so reading a change twice is harmless; missing one is what these rules prevent.

Pure functions of rows, numbers and ``now``: the relay reads, asks here, and applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from aegis_edge_core.cluster import Holder

__all__ = [
    "FULL_RESYNC_EVERY",
    "FeedCursor",
    "advance",
    "apply_holders",
    "read_from",
]

FULL_RESYNC_EVERY: Final = 300.0
"""Seconds between full reads (a safety net; the feed alone is complete)."""


@attrs.frozen(kw_only=True)
class FeedCursor:
    """Where a relay stands in the feed: the highest change number it has applied (-1:
    none yet, so the next read is a full one) and when its last full read was."""

    seq: int = -1
    full_at: float = 0.0


def read_from(cursor: FeedCursor, now: float, *, every: float = FULL_RESYNC_EVERY) -> int | None:
    """The change number to read after, or None for a full read (the first one, and one
    every ``every`` seconds)."""
    if cursor.seq < 0 or now - cursor.full_at >= every or now < cursor.full_at:
        return None
    return cursor.seq


def advance(
    cursor: FeedCursor, *, seqs: Iterable[int], head: int, full: bool, now: float
) -> FeedCursor:
    """The cursor after a read that returned rows numbered ``seqs`` while the sequence stood
    at ``head`` (its last number drawn, committed or not).

    After a full read the cursor is the highest number read (not ``head``: a change drawn
    but not yet committed must still come through the feed). After a feed read it only moves
    forward. A ``head`` below the cursor means the numbers started again (a restored or new
    database): the cursor goes back to none, so the next read is a full one.
    """
    highest = max(seqs, default=0)
    if full:
        return FeedCursor(seq=max(highest, 0), full_at=now)
    if head < cursor.seq:
        return FeedCursor()
    return attrs.evolve(cursor, seq=max(cursor.seq, highest))


def apply_holders(
    current: Mapping[str, Holder], rows: Iterable[Holder], *, full: bool
) -> dict[str, Holder]:
    """The holders after applying ``rows``: each row replaces the node's, a released row
    (no relay) drops it. A full read's rows are all there is: nodes absent from it had
    no holder then."""
    held = {} if full else dict(current)
    for row in rows:
        if row.relay_id:
            held[row.node_id] = row
        else:
            held.pop(row.node_id, None)
    return held
