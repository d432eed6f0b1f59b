"""The fleet view: every enrolled daemon, its live stream and its health, in memory.

The store is the truth across restarts; this is the working copy the event loop reads
without touching the store: a :class:`~.state.NodeState` per enrolled daemon (loaded at
start, updated in the same step that writes the store), the live daemon stream of each
node, the health tracker's statuses and the gauges and counters that follow from them.
Health *decisions* are the core's :class:`~aegis_edge_core.health.HealthTracker`; here they
are applied (gauge, log line).

Heartbeats update memory at once and reach the store in batches (:meth:`FleetView.flush_heartbeats`,
once per heartbeat interval, at least 2 s, on a relay of its own; every five minutes on a
shared store), so 10k daemons do not cost 10k transactions per interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

from aegis_edge_core.fleet.snapshot import DaemonSnapshot
from aegis_edge_core.health import DaemonStatus, HealthTracker, Transition
from aegis_edge_relay import jsonlog
from aegis_edge_relay.cluster import ClusterView
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.state import Clock, NodeState, StreamHandle
from aegis_edge_relay.store import NodeRecord, StoreWorker

__all__ = ["FleetView"]

_NO_STATUS: Final = DaemonStatus.DISCONNECTED


class FleetView:
    """Nodes, live streams and health of one relay process."""

    def __init__(
        self,
        *,
        health: HealthTracker,
        metrics: RelayMetrics,
        db: StoreWorker,
        clock: Clock,
        cluster: ClusterView,
    ) -> None:
        self.health = health
        self.cluster = cluster
        self.metrics = metrics
        self._db = db
        self.db = db
        self.now = clock
        self.nodes: dict[str, NodeState] = {}
        self.streams: dict[str, StreamHandle] = {}
        """The live *daemon* stream of each node (control sessions are not listed)."""
        self.connected_since: dict[str, float] = {}
        self.all_streams: set[StreamHandle] = set()
        """Every open stream, attested or not, control ones too (what a drain must end)."""
        self.draining = False
        """Set once the relay shuts down: per-stream lines drop to debug from then on."""
        self._pending_heartbeats: dict[str, float] = {}
        self._beat_counters: dict[str, Any] = {}
        """The heartbeat counter's child per tenant: ``labels()`` takes a lock and builds a
        key on every call, and it ran once per heartbeat."""
        self._attested_count = 0
        """Open attested streams (control ones too): stream-seconds accrue at this rate."""
        self._seconds_accounted_at = 0.0
        self._arrival = asyncio.Event()

    # ------------------------------------------------------------------ nodes

    def load(self, records: Iterable[NodeRecord]) -> None:
        """Seed the view from the store: every daemon Disconnected (or Revoked) until it
        attests again."""
        for rec in records:
            self.nodes[rec.node_id] = NodeState.from_record(rec)
            self.health.load(
                rec.node_id,
                DaemonStatus.REVOKED if rec.revoked else DaemonStatus.DISCONNECTED,
                rec.last_heartbeat_at,
            )
        self._reset_daemon_gauge()

    def merge(self, records: Iterable[NodeRecord]) -> list[tuple[NodeState, str]]:
        """Take in the store's rows as another relay changed them: daemons enrolled there
        join the view, tags and capabilities follow. Returns the nodes revoked elsewhere
        that this view has not seen revoked yet, with the reason (the caller cuts their streams)."""
        revoked: list[tuple[NodeState, str]] = []
        for rec in records:
            node = self.nodes.get(rec.node_id)
            if node is None:
                node = NodeState.from_record(rec)
                if rec.revoked:
                    self.nodes[rec.node_id] = node
                    self.health.load(rec.node_id, DaemonStatus.REVOKED, rec.last_heartbeat_at)
                    self.metrics.daemon_moved(node.tenant_id, None, DaemonStatus.REVOKED.value)
                else:
                    self.enrolled(node)
                continue
            if rec.revoked and not node.revoked:
                revoked.append((node, rec.revoked_reason or "revoked"))
            elif rec.node_id not in self.streams:
                # Held elsewhere: that relay is the writer of what its daemon reports.
                node.capabilities = dict(rec.capabilities)
                node.public_key = rec.public_key
                node.key_thumbprint = rec.key_thumbprint
            node.tags = set(rec.tags)
        return revoked

    def enrolled(self, node: NodeState) -> None:
        """A daemon the store has just enrolled joins the fleet, Disconnected. One the view
        has already (the change feed can bring a row while its writer still awaits the
        store's answer) is kept as it is."""
        if node.node_id in self.nodes:
            return
        self.nodes[node.node_id] = node
        self.health.load(node.node_id, DaemonStatus.DISCONNECTED)
        self.metrics.daemon_moved(node.tenant_id, None, DaemonStatus.DISCONNECTED.value)

    async def find(self, node_id: str) -> NodeState | None:
        """The daemon ``node_id``, read from the store if another relay of the cluster
        enrolled it after this one loaded the fleet."""
        node = self.nodes.get(node_id)
        if node is None:
            rec = await self._db.call(self._db.store.get_node, node_id)
            if rec is not None:
                self.enrolled(NodeState.from_record(rec))
                node = self.nodes[node_id]
        return node

    def _reset_daemon_gauge(self) -> None:
        pairs = []
        for node_id, node in self.nodes.items():
            status = self.health.status(node_id)
            if status is not None:
                pairs.append((node.tenant_id, status.value))
        self.metrics.set_daemon_counts(pairs)

    def status_of(self, node_id: str) -> DaemonStatus:
        """This relay's own status for the nodes it holds (and Revoked ones); for a node
        another relay holds, the cluster's."""
        local = self.health.status(node_id) or _NO_STATUS
        if node_id in self.streams or local is DaemonStatus.REVOKED:
            return local
        return self.cluster.status_elsewhere(node_id) or local

    def snapshots(self, tenants: frozenset[str] | None) -> list[DaemonSnapshot]:
        """What target resolution sees of the daemons of ``tenants`` (None: all)."""
        return [
            node.snapshot(self.status_of(node.node_id).value)
            for node in self.nodes.values()
            if tenants is None or node.tenant_id in tenants
        ]

    def host_label_source(self, node_id: str) -> dict[str, str]:
        """The labels a live-output host name is made from (none for an unknown node)."""
        node = self.nodes.get(node_id)
        labels = dict(node.capabilities.get("labels", {})) if node is not None else {}
        return {str(k): str(v) for k, v in labels.items()}

    # ------------------------------------------------------------------ health

    def apply_transitions(self, transitions: Iterable[Transition]) -> None:
        for t in transitions:
            self.cluster.status_changed(t.node_id, t.new)
            node = self.nodes.get(t.node_id)
            tenant = node.tenant_id if node else ""
            self.metrics.daemon_moved(
                tenant, t.old.value if t.old else None, t.new.value if t.new else None
            )
            jsonlog.log(
                # while draining every stream goes Disconnected at once: one summary line
                # (relay.drained) instead of 10k
                "debug" if self.draining else "info",
                "daemon.status",
                node_id=t.node_id,
                tenant_id=tenant,
                old=t.old.value if t.old else None,
                new=t.new.value,
                cause=t.cause.value,
            )

    def sweep(self, now: float) -> float | None:
        """Apply what staleness decided by ``now``; the tracker's next deadline."""
        self.apply_transitions(self.health.tick(now))
        return self.health.next_deadline()

    def heartbeat(self, node_id: str, tenant_id: str, now: float) -> None:
        self.apply_transitions(self.health.heartbeat(node_id, now))
        self._pending_heartbeats[node_id] = now
        counter = self._beat_counters.get(tenant_id)
        if counter is None:
            counter = self._beat_counters[tenant_id] = self.metrics.heartbeats.labels(
                tenant=tenant_id
            )
        counter.inc()

    async def flush_heartbeats(self) -> None:
        """Write the heartbeats noted since the last flush, in one store call."""
        if not self._pending_heartbeats:
            return
        beats, self._pending_heartbeats = self._pending_heartbeats, {}
        try:
            await self._db.call(self._db.store.flush_heartbeats, beats)
        except Exception:
            # Keep them for the next flush (newer beats that came in meanwhile win).
            self._pending_heartbeats = {**beats, **self._pending_heartbeats}
            raise

    # ------------------------------------------------------------------ stream-seconds

    def account_stream_seconds(self, now: float) -> None:
        """O(1): every open attested stream accrues one second per second."""
        if self._attested_count and self._seconds_accounted_at:
            self.metrics.stream_seconds.inc(
                self._attested_count * max(0.0, now - self._seconds_accounted_at)
            )
        self._seconds_accounted_at = now

    def stream_attested(self, handle: StreamHandle, now: float) -> None:
        self.account_stream_seconds(now)
        self._attested_count += 1
        handle.accounted_at = now
        self.arrived()

    def arrival(self) -> asyncio.Event:
        """Set at the next :meth:`arrived`: a daemon attested here, or the cluster's view of
        who holds which stream was read again (a waiter checks for its node and waits on)."""
        return self._arrival

    def arrived(self) -> None:
        event, self._arrival = self._arrival, asyncio.Event()
        event.set()

    def stream_ended(self, handle: StreamHandle, now: float) -> None:
        if handle.attested and handle.accounted_at:
            self.account_stream_seconds(now)
            self._attested_count -= 1
            handle.accounted_at = 0.0
