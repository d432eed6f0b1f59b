"""The relay's periodic loops, each a task that wakes at its part's next deadline.

* the health sweep: the fleet view's ``tick(now)`` at the health tracker's next deadline
  (no per-daemon timers);
* the handshake deadline: streams that did not attest in time are closed (one timer for
  all of them; idle while no stream is mid-handshake);
* the heartbeat flush: heartbeats noted in memory reach the store in one call;
* fleet runs' deadlines and cancel graces (:meth:`.runs.FleetRuns.tick`);
* maintenance: stream-seconds accounting, token refresh pushes, revocation pruning;
* the cluster (a shared store only): renew the lease, reread the other relays' leases,
  read the holder and node rows changed since the last turn (the change feed), and
  mirror revocations committed by another relay; route commands, results, output and
  run cancels through the store; drop every stream once this relay's own lease lapsed.

Every loop survives a failing store: it logs, and tries again at its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Final

from aegis_edge_core.identity.rotation import needs_refresh
from aegis_edge_relay import jsonlog
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService
from aegis_edge_relay.routing import Router
from aegis_edge_relay.runs import FleetRuns
from aegis_edge_relay.store import (
    NODES_CHANGED,
    RUN_CANCELS,
    Listener,
    NodeRecord,
    answered_run,
    relay_channel,
)
from aegis_edge_relay.streams import LEASE_LAPSED, StreamHandler

__all__ = ["Loops"]

PRUNE_EVERY: Final = 3600.0
PRUNE_RETRY: Final = 60.0
WAKE_GAP: Final = 0.1
"""Seconds the cluster sync waits after a wake-up, so the changes of one moment make one read."""
LISTEN_WAIT: Final = 1.0
"""Seconds one wait for store notifications lasts (what stopping the relay may wait)."""


class Loops:
    """Starts and stops the periodic loops over the parts they drive."""

    def __init__(
        self,
        *,
        fleet: FleetView,
        identity: IdentityService,
        streams: StreamHandler,
        runs: FleetRuns,
        router: Router,
        stale_threshold: float,
        heartbeat_flush_interval: float,
        fleet_tick_interval: float,
    ) -> None:
        self.fleet = fleet
        self.identity = identity
        self.streams = streams
        self.runs = runs
        self.router = router
        self.now = fleet.now
        self._sweep_step = max(0.05, min(1.0, stale_threshold / 4))
        self._flush_interval = heartbeat_flush_interval
        self._tick_interval = fleet_tick_interval
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        coros: tuple[Coroutine[Any, Any, None], ...] = (
            self._tick_loop(),
            self._sweep_loop(),
            self._flush_loop(),
            self._maintenance_loop(),
            self._handshake_loop(),
        )
        if self.fleet.cluster.shared:
            coros = (
                *coros,
                self._cluster_loop(),
                self._listen_loop(),
                self._route_loop(),
                self._lease_loop(),
            )
        for coro in coros:
            self._tasks.append(loop.create_task(coro))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            await self.runs.tick(self.now())

    async def _sweep_loop(self) -> None:
        step = self._sweep_step
        while True:
            now = self.now()
            deadline = self.fleet.sweep(now)
            wait = step if deadline is None else min(step, max(0.01, deadline - now + 0.001))
            await asyncio.sleep(wait)

    async def _handshake_loop(self) -> None:
        streams = self.streams
        while True:
            deadline = streams.handshakes.next_deadline()
            if deadline is None:
                streams.handshake_pending.clear()
                await streams.handshake_pending.wait()
                continue
            delay = deadline - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            streams.expire_handshakes(self.now())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.fleet.flush_heartbeats()
            except Exception as err:  # the loop must survive a busy disk
                jsonlog.log("error", "store.flush_failed", error=str(err))

    async def _cluster_loop(self) -> None:
        """A full turn (lease, holders, runs) every sync interval; between turns, a wake-up
        (another relay changed a node or holder row) reads only the change feed."""
        cluster = self.fleet.cluster
        loop = asyncio.get_running_loop()
        next_turn = loop.time() + cluster.interval  # the relay's start made the first turn
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cluster.wake.wait(), max(0.0, next_turn - loop.time()))
            if cluster.wake.is_set() and loop.time() < next_turn:
                # A storm of changes (a relay's daemons moving) coalesces into one read per
                # gap instead of one per transaction.
                await asyncio.sleep(WAKE_GAP)
                cluster.wake.clear()
                try:
                    records = await cluster.catch_up()
                except Exception as err:  # the next turn reads it
                    jsonlog.log("error", "cluster.sync_failed", error=str(err))
                    continue
                self._merge(records)
                continue
            cluster.wake.clear()
            next_turn = loop.time() + cluster.interval
            try:
                records = await cluster.sync()
            except Exception as err:  # the lease lapses if this keeps failing: that is right
                jsonlog.log("error", "cluster.sync_failed", error=str(err))
                continue
            self._merge(records)
            self.router.holders_lost(cluster.live)
            try:
                now = self.now()
                await self.runs.renew_leases(now + cluster.ttl)
                await self.runs.take_over_due(now)
            except Exception as err:
                jsonlog.log("error", "cluster.runs_failed", error=str(err))

    async def _lease_loop(self) -> None:
        """Drop every stream and let every run go once this relay's own lease lapsed (cut
        off from the store while the others were live: they hold this fleet now), and keep
        dropping streams that come back while it stays lapsed. Its own timer, so a sync
        stuck on an unreachable store does not hold the drop back."""
        cluster, streams = self.fleet.cluster, self.streams
        while True:
            now = self.now()
            if not cluster.lapsed(now):
                left = cluster.lease_expires_at - now
                # past expiry but not lapsed: it was alone, so look again at the next sync
                await asyncio.sleep(left if left > 0 else cluster.interval)
                continue
            # Its runs' leases lapsed with its own: another relay resumes them.
            self.runs.let_go("warning", "fleet.run_let_go")
            dropped = streams.drop_all(LEASE_LAPSED)
            if dropped:
                jsonlog.log(
                    "warning",
                    "cluster.lease_lapsed",
                    relay_id=cluster.relay_id,
                    lapsed_for=round(now - cluster.lease_expires_at, 3),
                    streams_dropped=dropped,
                )
            await asyncio.sleep(cluster.interval)

    def _merge(self, records: list[NodeRecord]) -> None:
        for node, reason in self.fleet.merge(records):
            self.identity.revoked_elsewhere(node, reason)
        self.fleet.arrived()  # the holders were read again: a drained daemon may be back

    async def _route_loop(self) -> None:
        """Commands routed to this relay, results and output routed back, and cancels of
        runs this relay coordinates: at once on a wake-up, and every sync interval as the
        sweep that catches a missed notification."""
        cluster = self.fleet.cluster
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cluster.route_wake.wait(), cluster.interval)
            cluster.route_wake.clear()
            try:
                await self.router.pump()
                await self.runs.take_cancels()
            except Exception as err:  # the next sweep tries again
                jsonlog.log("error", "cluster.route_failed", error=str(err))

    async def _listen_loop(self) -> None:
        """Wake the cluster loop on the store's notifications (a revocation by another
        relay reaches its streams in a round trip, not a sync interval), and a cancel
        waiting for another relay's answer as the answer is stored. The wait runs in a
        thread of its own: the store worker's thread must never block on it."""
        store, cluster = self.fleet.db.store, self.fleet.cluster
        listener: Listener | None = None
        try:
            while True:
                try:
                    if listener is None:
                        channels = [NODES_CHANGED, RUN_CANCELS, relay_channel(cluster.relay_id)]
                        listener = await asyncio.to_thread(store.listen, channels)
                        if listener is None:
                            return
                    for payload in await asyncio.to_thread(listener.wait, LISTEN_WAIT):
                        answered = answered_run(payload)
                        if answered is not None:
                            cluster.cancel_answers.wake(answered)
                        elif payload in ("revoked", "changed"):
                            cluster.wake.set()
                        else:
                            cluster.route_wake.set()
                except Exception as err:  # reconnect after a pause; the sync still runs
                    jsonlog.log("warning", "cluster.listen_failed", error=str(err))
                    if listener is not None:
                        with contextlib.suppress(Exception):
                            listener.close()
                        listener = None
                    await asyncio.sleep(1.0)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    listener.close()

    async def _maintenance_loop(self) -> None:
        """Slow chores: stream-seconds accounting, token refresh pushes, pruning."""
        last_prune = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self.now()
            self.fleet.account_stream_seconds(now)
            if now >= self.identity.next_refresh_scan:
                await self._refresh_tokens(now)
            if now - last_prune > PRUNE_EVERY:
                last_prune = now
                try:
                    await self.identity.prune(now)
                except Exception as err:  # a busy disk must not end the loop for good
                    last_prune = now - PRUNE_EVERY + PRUNE_RETRY  # try again in a minute
                    jsonlog.log("error", "store.prune_failed", error=str(err))

    async def _refresh_tokens(self, now: float) -> None:
        """Push fresh tokens to live daemons whose token is within the margin of expiry.

        A scan of every stream, but only when the earliest expiry says one is due (with 10k
        streams a scan every second was most of the relay's idle CPU)."""
        identity, fleet = self.identity, self.fleet
        margin = identity.refresh_margin
        soonest = now + 60.0
        for handle in list(fleet.streams.values()):
            node = fleet.nodes.get(handle.node_id or "")
            if node is None or handle.closing:
                continue
            if needs_refresh(node.token_expires_at, now, margin):
                with contextlib.suppress(Exception):
                    issued = await identity.issue_node_token(node)
                    handle.session.refresh_token(issued.token, issued.claims.expires_at)
                    handle.flush()
            if needs_refresh(node.token_expires_at, now, margin):
                soonest = now + 1.0  # the refresh failed: try again in a second
            else:
                soonest = min(soonest, node.token_expires_at - margin)
        identity.next_refresh_scan = soonest
