"""The relay's parts, constructed and wired together (:class:`Relay`); each part receives
what it uses and none of them imports this module. In construction order, each built from
the ones before it::

    store/ (StoreWorker) -> FleetView, IdentityService -> Dispatcher -> FleetRuns
        -> StreamHandler, EnrollmentService -> AdminService (admin/), Loops

plus one hook: the identity service tells the stream handler of each revocation, so the
node's live streams end (``identity.on_revoked(streams.cut_revoked)``). ``server`` puts
a :class:`Relay` behind the gRPC and HTTP listeners and runs it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Final

import attrs

from aegis_edge_core.drain import DEFAULT_ATTEST_RATE
from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    FEATURES,
    HandshakeGuard,
    HandshakeLimits,
)
from aegis_edge_core.health import HealthTracker
from aegis_edge_core.identity import NODE_TOKEN_TTL
from aegis_edge_core.ratelimit import (
    ATTEST_PER_NODE,
    ATTEST_PER_SOURCE,
    ENROLL_PER_SOURCE,
    REFRESH_PER_NODE,
    AttemptLimits,
    KeyedLimiter,
    Limit,
)
from aegis_edge_core.session import MAX_MESSAGE_BYTES
from aegis_edge_relay import jsonlog
from aegis_edge_relay.admin import AdminService
from aegis_edge_relay.cluster import ClusterView
from aegis_edge_relay.dispatcher import Dispatcher
from aegis_edge_relay.enrollment import EnrollmentService
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService, load_or_create_signing_key
from aegis_edge_relay.loops import Loops
from aegis_edge_relay.membership import join_cluster
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.routing import Router
from aegis_edge_relay.runs import FleetRuns
from aegis_edge_relay.startup import StartupError
from aegis_edge_relay.store import StoreWorker, open_store
from aegis_edge_relay.streams import StreamHandler, StreamSettings

__all__ = ["COARSE_HEARTBEAT_FLUSH", "Relay", "RelayConfig"]

COARSE_HEARTBEAT_FLUSH: Final = 300.0
"""On a shared store, how often heartbeats noted in memory are written: one row write per
idle daemon per five minutes, DESIGN.md's budget (measured: no other per-daemon write while
a daemon is idle; the leases cost each relay one write per renewal, whatever its fleet)."""


@attrs.define(kw_only=True)
class RelayConfig:
    data_dir: Path
    store_url: str | None = None
    """``--store``: None is SQLite in the data dir (see ``store.open_store``)."""
    heartbeat_interval: float = 30.0
    stale_threshold: float = 90.0
    node_token_ttl: float = NODE_TOKEN_TTL
    max_concurrent_commands: int = 16
    heartbeat_flush_interval: float = 2.0
    drain_grace: float = 5.0
    drain_rate: float = DEFAULT_ATTEST_RATE
    fleet_tick_interval: float = 0.1
    """How often fleet runs' deadlines and cancel graces are checked. Tests stretch it to
    make a daemon's kill at the deadline land before the relay's own tick."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    attest_limit_per_node: Limit | None = ATTEST_PER_NODE
    attest_limit_per_source: Limit | None = ATTEST_PER_SOURCE
    enroll_limit_per_source: Limit | None = ENROLL_PER_SOURCE
    refresh_limit_per_node: Limit | None = REFRESH_PER_NODE
    """Attempt rate limits (``None``: off); see :mod:`aegis_edge_core.ratelimit`."""
    handshake_timeout: float = DEFAULT_HANDSHAKE_DEADLINE
    max_unattested_per_source: int | None = DEFAULT_MAX_UNATTESTED_PER_SOURCE
    """Bounds on streams that have not attested yet; see :mod:`aegis_edge_core.handshake`."""
    cluster: str = ""
    """The cluster this relay joins at start (``membership``); empty for a single relay."""
    protocol_features: frozenset[str] = FEATURES


def _limiter(limit: Limit | None) -> KeyedLimiter | None:
    return KeyedLimiter(limit) if limit is not None else None


class Relay:
    """The relay's parts, wired; one per process (or per test)."""

    def __init__(self, config: RelayConfig, *, ca_der: bytes | None = None) -> None:
        clock = time.time
        signing_key = load_or_create_signing_key(config.data_dir)
        self._cluster = config.cluster
        self._ca_der = ca_der
        self.metrics = metrics = RelayMetrics()
        self.db = db = StoreWorker(open_store(config.store_url, config.data_dir))
        shared = db.store.shared
        self.cluster = cluster = ClusterView(
            relay_id=signing_key.kid,
            db=db,
            clock=clock,
            stale_threshold=config.stale_threshold,
            shared=shared,
            metrics=metrics,
        )

        health = HealthTracker(
            stale_threshold_secs=config.stale_threshold,
            heartbeat_interval_secs=config.heartbeat_interval,
        )
        self.fleet = fleet = FleetView(
            health=health, metrics=metrics, db=db, clock=clock, cluster=cluster
        )
        self.identity = identity = IdentityService(
            signing_key=signing_key,
            ca_der=ca_der,
            nodes=fleet.nodes,
            db=db,
            clock=clock,
            node_token_ttl=config.node_token_ttl,
            refresh_limit=config.refresh_limit_per_node,
        )
        self.dispatcher = dispatcher = Dispatcher(fleet=fleet, db=db, metrics=metrics, clock=clock)
        self.router = router = Router(dispatcher)
        self.runs = runs = FleetRuns(
            dispatcher=dispatcher,
            router=router,
            fleet=fleet,
            db=db,
            metrics=metrics,
            clock=clock,
            drain_rate=config.drain_rate,
        )
        self.streams = streams = StreamHandler(
            settings=StreamSettings(
                heartbeat_interval=config.heartbeat_interval,
                stale_threshold=config.stale_threshold,
                max_concurrent_commands=config.max_concurrent_commands,
                max_message_bytes=config.max_message_bytes,
                drain_grace=config.drain_grace,
                drain_rate=config.drain_rate,
                features=config.protocol_features,
            ),
            fleet=fleet,
            identity=identity,
            dispatcher=dispatcher,
            db=db,
            metrics=metrics,
            attest_limits=AttemptLimits(
                per_source=_limiter(config.attest_limit_per_source),
                per_node=_limiter(config.attest_limit_per_node),
            ),
            handshakes=HandshakeGuard(
                HandshakeLimits(
                    deadline_secs=config.handshake_timeout,
                    max_unattested_per_source=config.max_unattested_per_source,
                )
            ),
        )
        identity.on_revoked(streams.cut_revoked)
        self.enrollment = EnrollmentService(
            identity=identity,
            fleet=fleet,
            db=db,
            metrics=metrics,
            limits=AttemptLimits(per_source=_limiter(config.enroll_limit_per_source)),
            heartbeat_interval=config.heartbeat_interval,
        )
        self.admin = AdminService(fleet=fleet, identity=identity, runs=runs, db=db)
        self.loops = Loops(
            fleet=fleet,
            identity=identity,
            streams=streams,
            runs=runs,
            router=router,
            stale_threshold=config.stale_threshold,
            # Shared: heartbeats stay in memory (the holder answers for its nodes) and reach
            # the store coarsely, so an idle daemon costs one row write per few minutes.
            # Alone: the store lags memory by at most one heartbeat interval (its value is
            # read only after a crash, as "last seen"), one transaction per interval rather
            # than one per 2 s: at 30 s, ~10% of a steady relay's samples went to the commits.
            heartbeat_flush_interval=max(config.heartbeat_flush_interval, COARSE_HEARTBEAT_FLUSH)
            if shared
            else max(config.heartbeat_flush_interval, config.heartbeat_interval),
            fleet_tick_interval=config.fleet_tick_interval,
        )

    async def start(self) -> None:
        db = self.db
        records = await db.call(db.store.load_nodes)
        if self._cluster:
            if self._ca_der is None:
                raise StartupError(f"--cluster {self._cluster}: a cluster needs TLS (its CA)")
            await join_cluster(db, self._cluster, self._ca_der, time.time())
            self.identity.cluster = self._cluster
        await self.identity.load()
        await self.identity.publish_endpoint()
        self.fleet.load(records)
        # what other relays changed between the load and the cluster's first (full) read
        for node, reason in self.fleet.merge(await self.cluster.start()):
            self.identity.revoked_elsewhere(node, reason)
        await self.dispatcher.recover()
        await self.runs.recover()
        self.loops.start()
        jsonlog.log("info", "relay.started", daemons=len(self.fleet.nodes))

    @property
    def relay_id(self) -> str:
        """This relay's id in a cluster: its signing key's ``kid``."""
        return self.identity.relay_id

    async def drain(self, *, hand_over: bool = False) -> None:
        """Drain every daemon stream. On a shared store, or with ``hand_over`` (a successor
        takes over this data dir), the fleet runs are left to the next relay first instead
        of being cancelled at :meth:`stop`."""
        if hand_over:
            self.dispatcher.handing_over = True  # what runs now ends at the successor
        if self.cluster.shared or hand_over:
            await self.runs.hand_over()  # before the streams go: another relay resumes them
        if self.cluster.shared:
            # The live relays as of now: each Drain names one of them to go to.
            with contextlib.suppress(Exception):
                await self.cluster.sync()
        await self.streams.drain()

    async def stop(self) -> None:
        self.db.stopping()  # a store down now costs seconds, not minutes per write
        await self.runs.cancel_all("relay shutting down")
        await self.loops.stop()
        await self.dispatcher.stop()
        await self.cluster.stop()
        await self.fleet.flush_heartbeats()
        self.fleet.account_stream_seconds(self.fleet.now())
        self.db.close()
        jsonlog.log("info", "relay.store_closed")
