"""The rules of a cluster of relays over one store: relay leases, who holds a node's stream,
the status a relay shows for a node held elsewhere, and when a fleet run may be taken over.

Pure functions of rows and ``now``: the relay reads the rows, asks here, and writes back
what these decide. A single relay (the SQLite default) is a cluster of one: it holds every
stream, so every status it shows is its own health tracker's.

* A relay's **lease** is live until its ``expires_at``; the relay renews it every third of
  its length, so one missed renewal does not expire it but a dead relay's lapses within
  :func:`lease_ttl` seconds.
* A node's **holder** row names the relay whose stream it is and the stream's
  **generation**, one more than the row it replaced: a stream that ends clears the row only
  if the generation is still its own, so a late hang-up at an old relay never erases a
  newer stream held elsewhere.
* A node held by another relay shows that relay's recorded status while its lease is live,
  and Disconnected once it lapses (unless the node reconnected and a live relay holds it).
* A relay whose own lease lapsed (it could not renew it: cut off from the store) drops its
  streams if other relays were live: they already show its nodes Disconnected and route
  nothing to it, and it can no longer record that it holds them. Its daemons dial the
  next relay and land there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final

import attrs

from aegis_edge_core.health import DaemonStatus

__all__ = [
    "HELD_STATUSES",
    "Holder",
    "RelayLease",
    "held_status",
    "lease_live",
    "lease_ttl",
    "live_relays",
    "must_drop_streams",
    "release_applies",
    "renew_every",
    "run_takeover_due",
    "shown_status",
    "succeeding_generation",
]

MAX_LEASE_TTL: Final = 15.0
"""A relay's lease never lasts longer than this, however long the stale threshold: the
longer it is, the longer runs wait before another relay takes them over."""

HELD_STATUSES: Final = frozenset({DaemonStatus.CONNECTED, DaemonStatus.UNHEALTHY})
"""The statuses a holder row records (a stream that is not held has no row)."""


@attrs.frozen(kw_only=True)
class RelayLease:
    relay_id: str
    endpoint: str
    expires_at: float


@attrs.frozen(kw_only=True)
class Holder:
    node_id: str
    relay_id: str
    generation: int
    status: DaemonStatus = DaemonStatus.CONNECTED
    since: float = 0.0


def lease_ttl(stale_threshold: float) -> float:
    """How long a relay's lease lasts: half the stale threshold (capped), so survivors see a
    dead relay's nodes go Disconnected within the threshold -- the lease lapses in half of
    it and their next look at the rows (every :func:`renew_every`) falls in the other."""
    if stale_threshold <= 0:
        raise ValueError("stale threshold must be positive")
    return min(MAX_LEASE_TTL, stale_threshold / 2)


def renew_every(ttl: float) -> float:
    """How often a relay renews its lease (and rereads the others'): a third of its life."""
    return ttl / 3


def lease_live(lease: RelayLease | None, now: float) -> bool:
    return lease is not None and now < lease.expires_at


def live_relays(leases: Iterable[RelayLease], now: float) -> frozenset[str]:
    return frozenset(lease.relay_id for lease in leases if lease_live(lease, now))


def must_drop_streams(
    own_lease_expires_at: float, now: float, other_relays: Collection[str]
) -> bool:
    """Whether a relay must drop every daemon stream it holds: its own lease, as it last
    renewed it, expired at ``own_lease_expires_at``, ``now`` is at or past that, and
    ``other_relays`` (the other relays live at its last look at the leases) is not empty.

    A relay cut off from the store keeps serving until its lease lapses (a short outage
    costs nothing), and not a moment longer: from then on the others treat its nodes as
    held by nobody. A relay that was alone keeps its streams: its daemons have nowhere
    else to go, and it picks up where it was when the store is back."""
    return bool(other_relays) and now >= own_lease_expires_at


def succeeding_generation(current: Holder | None) -> int:
    """The generation of a stream that replaces ``current`` (1 for a node never held)."""
    return 1 if current is None else current.generation + 1


def release_applies(current: Holder | None, relay_id: str, generation: int) -> bool:
    """Whether a stream of ``relay_id`` with ``generation`` that ended clears ``current``:
    only if the row is still that very stream's."""
    return current is not None and current.relay_id == relay_id and current.generation == generation


def held_status(status: DaemonStatus) -> DaemonStatus | None:
    """What a holder records for its tracker's ``status``: None (drop the row) once the node
    is Disconnected or Revoked there."""
    return status if status in HELD_STATUSES else None


def shown_status(
    holder: Holder | None, live: Collection[str], *, revoked: bool = False
) -> DaemonStatus:
    """The status of a node whose stream this relay does not hold, from its holder row and
    the relays whose leases are live."""
    if revoked:
        return DaemonStatus.REVOKED
    if holder is None or holder.relay_id not in live:
        return DaemonStatus.DISCONNECTED
    return holder.status


def run_takeover_due(
    coordinator: str,
    lease_expires_at: float,
    live: Collection[str],
    now: float,
    *,
    this_relay: str,
) -> bool:
    """Whether ``this_relay``, which does not drive the unfinished fleet run, may take its
    coordination over: its coordinator lease lapsed, the relay that holds it has no live
    lease any more (it died), or the lease names this very relay (left by its previous
    life, killed before it could hand the run over)."""
    return coordinator == this_relay or now >= lease_expires_at or coordinator not in live
