"""This relay's place in a cluster of relays over one shared store (PostgreSQL).

It renews this relay's lease row, records which streams this relay holds (one
``stream_holders`` row per node, with the stream's generation), writes a held node's status
when it changes, and keeps a copy of the other relays' leases and holder rows, brought up to
date every :func:`~aegis_edge_core.cluster.renew_every` seconds, so that the fleet view can
show a node held elsewhere with the status the core's
:func:`~aegis_edge_core.cluster.shown_status` gives it. Holder and node rows come by change
feed (:mod:`aegis_edge_core.cluster_feed`): each sync reads only the rows changed since the
last, with a full read at start and every few minutes. The rules are the core's; this part
only moves rows.

On a store that is not shared (SQLite: one relay) the part is inert -- no rows, no writes --
so the single relay behaves exactly as before: it holds every stream there is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

from aegis_edge_core.cluster import (
    Holder,
    RelayLease,
    lease_ttl,
    live_relays,
    must_drop_streams,
    renew_every,
    shown_status,
)
from aegis_edge_core.cluster_feed import FeedCursor, advance, apply_holders, read_from
from aegis_edge_core.health import DaemonStatus
from aegis_edge_relay import jsonlog
from aegis_edge_relay.groupcommit import GroupCommit
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.state import Clock
from aegis_edge_relay.store import NodeRecord, StoreWorker

__all__ = ["ClusterView", "Wakeups"]

_PENDING: Final = 0
"""The generation of a stream whose holder row is being written."""


class Wakeups:
    """Waiters for a keyed store notification (a run's cancel answered, by run id)."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set by every :meth:`wake` of ``key`` while the block runs."""
        event = asyncio.Event()
        self._waiting.setdefault(key, []).append(event)
        try:
            yield event
        finally:
            events = self._waiting[key]
            events.remove(event)
            if not events:
                del self._waiting[key]

    def wake(self, key: str) -> None:
        for event in self._waiting.get(key, ()):
            event.set()

    def __len__(self) -> int:
        """How many keys are watched (a block left behind nothing)."""
        return len(self._waiting)


class ClusterView:
    """Leases and stream holders of the cluster, as this relay sees and writes them."""

    def __init__(
        self,
        *,
        relay_id: str,
        db: StoreWorker,
        clock: Clock,
        stale_threshold: float,
        shared: bool,
        metrics: RelayMetrics,
    ) -> None:
        self.relay_id = relay_id
        self.metrics = metrics
        self.shared = shared
        self.endpoint = ""
        """Where daemons reach this relay (``host:port``); set once it listens."""
        self.ttl = lease_ttl(stale_threshold)
        self.interval = renew_every(self.ttl)
        self.now = clock
        self._db = db
        self._holds: GroupCommit[tuple[str, str, str, float], int] = GroupCommit(
            db, db.store.hold_streams, persist=False
        )
        self.lease_expires_at = 0.0
        """When this relay's own lease expires, as it last renewed it."""
        self.live: frozenset[str] = frozenset()
        self.endpoints: dict[str, str] = {}
        """relay id -> endpoint of every live relay (as of the last :meth:`sync`)."""
        self.holders: dict[str, Holder] = {}
        """The holder rows of the other relays (as of the last :meth:`sync`)."""
        self.feed = FeedCursor()
        """Where this relay stands in the change feed."""
        self._held: dict[str, tuple[int, int]] = {}
        """node_id -> (stream id, generation) of the streams this relay holds."""
        self._statuses: dict[str, DaemonStatus] = {}
        """Status changes of held nodes not written yet."""
        self._releases: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        """Set by a store notification: sync now rather than at the next interval."""
        self.route_wake = asyncio.Event()
        """Set when commands were routed to this relay, or results routed back to it."""
        self.cancel_answers = Wakeups()
        """Woken when a run's cancel this relay asked another relay for is answered."""

    # ------------------------------------------------------------------ what others hold

    def status_elsewhere(self, node_id: str) -> DaemonStatus | None:
        """The status of a node another relay holds (None: no other relay holds it)."""
        holder = self.holders.get(node_id)
        if holder is None or holder.relay_id == self.relay_id:
            return None
        return shown_status(holder, self.live)

    def lapsed(self, now: float) -> bool:
        """Whether this relay must hold no stream now: cut off from the store, its lease
        lapsed while others were live (the core's ``must_drop_streams``)."""
        return self.shared and must_drop_streams(
            self.lease_expires_at, now, self.live - {self.relay_id}
        )

    def other_endpoints(self) -> tuple[str, ...]:
        """Where the other live relays take daemons (sorted): a drain sends them there."""
        return tuple(
            sorted(
                {
                    endpoint
                    for relay_id, endpoint in self.endpoints.items()
                    if relay_id != self.relay_id and endpoint and endpoint != self.endpoint
                }
            )
        )

    def holder_of(self, node_id: str) -> str | None:
        """The live relay other than this one that holds the node's stream, if any."""
        holder = self.holders.get(node_id)
        if holder is None or holder.relay_id == self.relay_id or holder.relay_id not in self.live:
            return None
        return holder.relay_id

    async def start(self) -> list[NodeRecord]:
        """Claim the lease, releasing what a previous run of this relay held (it was killed:
        its streams are gone), and read the others' rows (a full read: every node row)."""
        if not self.shared:
            return []
        db = self._db
        released = await db.call(db.store.drop_lease, self.relay_id)
        if released:
            jsonlog.log("info", "cluster.released_stale", relay_id=self.relay_id, streams=released)
        return await self.sync()

    async def sync(self) -> list[NodeRecord]:
        """Renew this relay's lease, reread everyone's leases, bring the holders up to date
        from the change feed, and write the held statuses that changed. Returns the node
        rows changed since the last sync (every one on a full read)."""
        if not self.shared:
            return []
        db = self._db
        now = self.now()
        lease = RelayLease(
            relay_id=self.relay_id, endpoint=self.endpoint, expires_at=now + self.ttl
        )
        await db.call(db.store.renew_lease, lease)
        self.lease_expires_at = lease.expires_at
        await self.flush_statuses()
        leases = await db.call(db.store.load_leases)
        records = await self.catch_up()
        self.live = live_relays(leases, self.now())
        self.endpoints = {
            lease.relay_id: lease.endpoint for lease in leases if lease.relay_id in self.live
        }
        return records

    async def catch_up(self) -> list[NodeRecord]:
        """Read the change feed (a full read when the core's rules say so) and apply its
        holder rows; the node rows changed, for the fleet view."""
        if not self.shared:
            return []
        db = self._db
        now = self.now()
        feed = await db.call(db.store.node_feed, read_from(self.feed, now))
        self.feed = advance(self.feed, seqs=feed.seqs, head=feed.head, full=feed.full, now=now)
        self.holders = apply_holders(self.holders, feed.holders, full=feed.full)
        read = "full" if feed.full else "feed"
        self.metrics.cluster_syncs.labels(read=read).inc()
        self.metrics.cluster_sync_rows.labels(read=read).inc(len(feed.nodes) + len(feed.holders))
        return list(feed.nodes)

    async def stop(self) -> None:
        """Leave the cluster: drop the lease and release every held stream at once, so the
        others show this relay's nodes Disconnected without waiting for the lease to lapse."""
        if not self.shared:
            return
        for task in list(self._releases):
            await task
        # Dropping the lease releases every row still held here: the streams that end
        # after it (a drain's last writes, once the store is closed) have none to release.
        self._held.clear()
        self._statuses.clear()
        db = self._db
        await db.call(db.store.drop_lease, self.relay_id)

    # ------------------------------------------------------------------ what this relay holds

    async def hold(self, node_id: str, stream_id: int, status: DaemonStatus) -> None:
        """A daemon stream attested here: record this relay as its holder."""
        if not self.shared:
            return
        self._held[node_id] = (stream_id, _PENDING)
        self._statuses.pop(node_id, None)
        # Attestations that arrive together share one transaction: on PostgreSQL each holder
        # row is a commit with the change feed's trigger, lock and NOTIFY, and a restarted
        # relay attests its whole fleet at once.
        generation = await self._holds.submit((node_id, self.relay_id, status.value, self.now()))
        assert generation is not None
        if self._held.get(node_id) == (stream_id, _PENDING):
            self._held[node_id] = (stream_id, generation)
        else:
            # The stream ended (or a newer one attested) while the row was written.
            self._release(node_id, generation)

    def stream_closed(self, node_id: str, stream_id: int) -> None:
        """A daemon stream of this relay ended: release its row if it is still its own."""
        held = self._held.get(node_id)
        if held is None or held[0] != stream_id:
            return
        del self._held[node_id]
        self._statuses.pop(node_id, None)
        if held[1] != _PENDING:
            self._release(node_id, held[1])

    def status_changed(self, node_id: str, status: DaemonStatus) -> None:
        if node_id in self._held:
            self._statuses[node_id] = status

    async def flush_statuses(self) -> None:
        if not self._statuses:
            return
        pending, self._statuses = self._statuses, {}
        rows = [
            (node_id, held[1], status.value)
            for node_id, status in pending.items()
            if (held := self._held.get(node_id)) is not None and held[1] != _PENDING
        ]
        try:
            await self._db.call(self._db.store.set_held_statuses, self.relay_id, rows)
        except Exception:
            self._statuses = {**pending, **self._statuses}
            raise

    def _release(self, node_id: str, generation: int) -> None:
        if self.lapsed(self.now()):
            return  # the lapsed lease released it for the others; the store is out of reach

        async def release() -> None:
            db = self._db
            try:
                await db.call(db.store.release_stream, node_id, self.relay_id, generation)
            except Exception as err:  # the lease lapsing releases it for the others anyway
                jsonlog.log("warning", "cluster.release_failed", node_id=node_id, error=str(err))

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
