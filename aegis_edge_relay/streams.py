"""The daemon-stream handler: ``EdgeStream.Connect`` pumped into the core's session.

Each call gets a :class:`~.state.StreamHandle`: one task writes its outbox, one reads raw
frames into its :class:`RelaySession` and acts on the events that come back. Every decision
is the core's: the stream protocol (:class:`RelaySession`), the handshake bounds
(:class:`HandshakeGuard`), attempt limits (:class:`AttemptLimits`), attestation
(:func:`verify_attestation`), rotation (via :class:`~.identity.IdentityService`), health
(via :class:`~.fleetview.FleetView`). Results and output go to the
:class:`~.dispatcher.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any, Final

import attrs
import grpc

from aegis_edge_core.drain import DEFAULT_ATTEST_RATE, hint_at
from aegis_edge_core.errors import RemoteProtocolError
from aegis_edge_core.handshake import (
    FEATURES,
    HEARTBEAT_KEEPALIVE,
    RESULT_ACK_BATCH,
    HandshakeGuard,
    HandshakeRefusal,
    grant,
    heartbeat_ack_every,
)
from aegis_edge_core.identity import AttestationError, RotationError, verify_attestation
from aegis_edge_core.identity.rotation import RotationProof, needs_refresh
from aegis_edge_core.ratelimit import AttemptLimits, Decision, source_of
from aegis_edge_core.session import (
    AttestationReceived,
    CapabilitiesChanged,
    Event,
    HeartbeatReceived,
    HelloReceived,
    OutputReceived,
    ResultReceived,
    RotateKeyRequested,
    TokenRefreshRequested,
)
from aegis_edge_core.wire import common_pb2
from aegis_edge_relay import jsonlog
from aegis_edge_relay.dispatcher import Dispatcher
from aegis_edge_relay.drainer import Drain
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.refusals import refuse_at_open
from aegis_edge_relay.state import CloseStream, NodeState, StreamHandle, capabilities_from_proto
from aegis_edge_relay.store import StoreUnavailable, StoreWorker

__all__ = ["LEASE_LAPSED", "StreamHandler", "StreamSettings"]

LEASE_LAPSED: Final = (
    "this relay lost its store and its lease lapsed; the other relays hold this fleet now"
)

Context = grpc.aio.ServicerContext[Any, Any]

_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

_PROTOCOL_REASONS: Final = {
    "INVALID_ARGUMENT": "malformed",
    "FAILED_PRECONDITION": "out_of_order",
    "RESOURCE_EXHAUSTED": "oversized",
}


@attrs.frozen(kw_only=True)
class StreamSettings:
    """What the relay tells daemons when it accepts them, and its bounds on a stream."""

    heartbeat_interval: float
    stale_threshold: float
    max_concurrent_commands: int
    max_message_bytes: int
    drain_grace: float
    drain_rate: float = DEFAULT_ATTEST_RATE
    """Attestations per second the relay that takes the fleet back manages (the drain plan's
    rate, :mod:`aegis_edge_core.drain`)."""
    features: frozenset[str] = FEATURES
    """The optional features used with a daemon that offers them."""


class StreamHandler:
    """Every daemon and control stream of one relay."""

    def __init__(
        self,
        *,
        settings: StreamSettings,
        fleet: FleetView,
        identity: IdentityService,
        dispatcher: Dispatcher,
        db: StoreWorker,
        metrics: RelayMetrics,
        attest_limits: AttemptLimits,
        handshakes: HandshakeGuard,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.identity = identity
        self.dispatcher = dispatcher
        self._db = db
        self.metrics = metrics
        self.now = fleet.now
        self.attest_limits = attest_limits
        self.handshakes = handshakes
        self._unattested: dict[int, StreamHandle] = {}
        """The streams the guard holds a deadline for, by stream id."""
        self.handshake_pending = asyncio.Event()
        """Set when a stream starts its handshake (the deadline loop waits for it)."""
        self._drain = Drain(
            grace=settings.drain_grace, attest_rate=settings.drain_rate, now=self.now
        )
        self._results_in: list[tuple[StreamHandle, ResultReceived]] = []
        """Results read on ``result-ack-batch`` streams and not yet being stored."""
        self._result_store: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the call

    async def connect(self, request_iterator: Any, context: Context) -> None:
        """``EdgeStream.Connect``: one task writes the outbox, one reads and decides."""
        handle = StreamHandle(
            peer=context.peer(), max_message_bytes=self.settings.max_message_bytes
        )
        if self.fleet.draining:
            await refuse_at_open(context, "unavailable", "relay is shutting down", self.now)
        now = self.now()
        refusal = self.handshakes.admit(handle.id, source=source_of(handle.peer), now=now)
        if refusal is not None:
            self._count_handshake_refusal(refusal, handle.peer, None)
            await refuse_at_open(context, refusal.reason, refusal.message, self.now)
        self._unattested[handle.id] = handle
        self.handshake_pending.set()
        self.fleet.all_streams.add(handle)
        reader = asyncio.get_running_loop().create_task(self._read_loop(handle, context))
        close: CloseStream | None = None
        try:
            while True:
                item = await handle.outbox.get()
                if isinstance(item, CloseStream):
                    close = item
                    break
                if handle.drain_due is not None and item.WhichOneof("body") == "drain":
                    item.drain.reconnect_after_secs = hint_at(handle.drain_due, time.monotonic())
                await context.write(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._stream_gone(handle)
        if close is not None and close.code is not None:
            await context.abort(close.code, close.details, close.trailing_metadata)

    async def _read_loop(self, handle: StreamHandle, context: Context) -> None:
        try:
            while not handle.closing:
                data = await context.read()
                if data is _EOF:
                    handle.close()
                    return
                if handle.closing:
                    return
                assert isinstance(data, bytes)
                events = handle.session.receive_bytes(data, self.now())
                for event in events:
                    await self._on_event(handle, event)
                    if handle.closing:
                        break
                handle.flush()
        except RemoteProtocolError as err:
            reason = _PROTOCOL_REASONS.get(err.grpc_status, "malformed")
            self.metrics.stream_protocol_errors.labels(reason=reason).inc()
            jsonlog.log(
                "warning",
                "stream.protocol_error",
                node_id=handle.node_id,
                tenant_id=handle.tenant_id,
                reason=reason,
                error=str(err),
                peer=handle.peer,
            )
            # The session's finer code (out of order, oversized) stands.
            handle.refuse(err.reason, str(err), self.now(), code=err.grpc_status)
        except StoreUnavailable as err:
            jsonlog.log("error", "stream.store_unavailable", node_id=handle.node_id, error=str(err))
            handle.refuse("unavailable", "relay store unavailable; retry later", self.now())
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._failed(handle, err)

    def _failed(self, handle: StreamHandle, err: Exception) -> None:
        if isinstance(err, StoreUnavailable):
            jsonlog.log("error", "stream.store_unavailable", node_id=handle.node_id, error=str(err))
            handle.close(grpc.StatusCode.UNAVAILABLE, "relay store unavailable; retry later")
            return
        jsonlog.log(
            "error", "stream.failed", node_id=handle.node_id, error=repr(err), peer=handle.peer
        )
        handle.close(grpc.StatusCode.INTERNAL, "relay error")

    def _stream_gone(self, handle: StreamHandle) -> None:
        fleet = self.fleet
        fleet.all_streams.discard(handle)
        self.handshakes.settle(handle.id)
        self._unattested.pop(handle.id, None)
        now = self.now()
        fleet.stream_ended(handle, now)
        if not handle.attested or handle.control or handle.node_id is None:
            return
        lost = handle.session.connection_lost()
        if lost:
            self.dispatcher.connection_lost(handle.node_id, lost)
        fleet.cluster.stream_closed(handle.node_id, handle.id)
        if fleet.streams.get(handle.node_id) is handle:
            del fleet.streams[handle.node_id]
            fleet.connected_since.pop(handle.node_id, None)
        fleet.apply_transitions(
            fleet.health.stream_closed(handle.node_id, now, stream_id=handle.id)
        )
        jsonlog.log(
            "debug" if fleet.draining else "info",
            "stream.closed",
            node_id=handle.node_id,
            tenant_id=handle.tenant_id,
            seconds=round(now - handle.connected_since, 3),
        )

    # ------------------------------------------------------------------ events

    async def _on_event(self, handle: StreamHandle, event: Event) -> None:
        now = self.now()
        if isinstance(event, HeartbeatReceived):
            node_id = handle.node_id
            assert node_id is not None
            if handle.control:
                return
            self.fleet.heartbeat(node_id, handle.tenant_id or "", now)
            if event.token_jti:
                node = self.fleet.nodes.get(node_id)
                if node is not None:
                    await self.identity.token_confirmed(node, event.token_jti, now)
        elif isinstance(event, HelloReceived):
            # The per-node bucket is keyed on (node id, source): a node id is an unverified
            # claim here, and a stranger flooding hellos that name it must not lock the
            # real daemon (which connects from elsewhere) out.
            source = source_of(handle.peer)
            decision = self.attest_limits.check(
                now, source=source, node=f"{event.node_id}@{source}"
            )
            if not decision.allowed:
                self._refuse_rate_limited(handle, event.node_id, decision, now)
                return
            handle.node_id = event.node_id
            handle.control = event.control
            handle.hello_token = event.node_token
            handle.hello_capabilities = event.capabilities
            handle.host_time = event.host_time or None
            handle.session.challenge(os.urandom(32), now)
        elif isinstance(event, AttestationReceived):
            await self._attest(handle, event, now)
        elif isinstance(event, ResultReceived):
            assert handle.node_id is not None
            if RESULT_ACK_BATCH in handle.session.features:
                self._results_in.append((handle, event))
                if self._result_store is None:
                    self._result_store = asyncio.get_running_loop().create_task(
                        self._store_results()
                    )
                return
            dispatcher = self.dispatcher
            ends = await dispatcher.store_results([(handle.node_id, event.result)])
            handle.session.ack_result(event.result.command_id)
            handle.flush()
            for pending, end in ends:
                await dispatcher.tell(pending, end)
        elif isinstance(event, OutputReceived):
            assert handle.node_id is not None
            self.dispatcher.on_output(handle.node_id, event)
        elif isinstance(event, CapabilitiesChanged):
            await self._set_capabilities(handle, event.capabilities)
        elif isinstance(event, TokenRefreshRequested):
            node = self.fleet.nodes[handle.node_id or ""]
            refused = self.identity.check_refresh(node.node_id, now)
            if refused is not None:
                self._refresh_limited(handle, node, refused)
                return
            issued = await self.identity.issue_node_token(node)
            self.metrics.token_refreshes.labels(result="issued").inc()
            handle.session.refresh_token(issued.token, issued.claims.expires_at)
        elif isinstance(event, RotateKeyRequested):
            await self._rotate(handle, event, now)

    async def _store_results(self) -> None:
        """Store what came in on every ``result-ack-batch`` stream all at once (one group
        commit), ack each stream's share in one message, then tell the waiters; repeat
        while more arrived meanwhile. Reading goes on beside it: a daemon sending a spool
        of results after a reconnect waits for one commit, not one per result, and the
        10k results of a fleet run take a few commits and no task each."""
        dispatcher = self.dispatcher
        try:
            while self._results_in:
                batch, self._results_in = self._results_in, []
                try:
                    ends = await dispatcher.store_results(
                        [(handle.node_id or "", event.result) for handle, event in batch]
                    )
                except Exception as err:
                    for handle in {handle for handle, _ in batch}:
                        self._failed(handle, err)
                    continue
                acks: dict[StreamHandle, list[str]] = {}
                for handle, event in batch:
                    acks.setdefault(handle, []).append(event.result.command_id)
                for handle, command_ids in acks.items():
                    if handle.closing:
                        continue  # stored, not acked: the daemon sends them again (late)
                    handle.session.ack_results(command_ids)
                    handle.flush()
                for pending, end in ends:
                    try:
                        await dispatcher.tell(pending, end)
                    except Exception as err:
                        jsonlog.log(
                            "error",
                            "dispatcher.listener_failed",
                            command_id=end.command_id,
                            error=repr(err),
                        )
        finally:
            self._result_store = None

    def _count_handshake_refusal(
        self, refusal: HandshakeRefusal, peer: str, node_id: str | None
    ) -> None:
        self.metrics.refusals.labels(reason=refusal.reason).inc()
        jsonlog.log(
            "warning",
            "stream.refused",
            node_id=node_id,
            reason=refusal.reason,
            error=refusal.message,
            peer=peer,
        )

    def expire_handshakes(self, now: float) -> None:
        """Close the streams that did not attest by their deadline."""
        for refusal in self.handshakes.expire(now):
            handle = self._unattested.pop(refusal.stream_id, None)
            if handle is None or handle.closing:
                continue
            self._count_handshake_refusal(refusal, handle.peer, handle.node_id)
            handle.refuse(refusal.reason, refusal.message, now)

    def _refuse_rate_limited(
        self, handle: StreamHandle, node_id: str, decision: Decision, now: float
    ) -> None:
        retry = round(max(decision.retry_after, 0.001), 3)
        self.metrics.refusals.labels(reason="rate_limited").inc()
        jsonlog.log(
            "warning",
            "stream.refused",
            node_id=node_id,
            reason="rate_limited",
            retry_after_secs=retry,
            peer=handle.peer,
        )
        message = f"too many connection attempts; retry in {retry:g}s"
        handle.session.refuse("rate_limited", message, now, retry_after_secs=retry)
        handle.refuse("rate_limited", message, now, retry_after_secs=retry)

    def _refresh_limited(self, handle: StreamHandle, node: NodeState, decision: Decision) -> None:
        """Over the per-node refresh limit: issue nothing and keep the stream.

        The request goes unanswered: the relay still pushes a refresh by itself before the
        token expires (that push is not limited), so an honest daemon loses nothing, and a
        looping one costs a counter increment per request. One log line per stream."""
        self.metrics.token_refreshes.labels(result="rate_limited").inc()
        if handle.refresh_limit_logged:
            return
        handle.refresh_limit_logged = True
        jsonlog.log(
            "warning",
            "token.refresh_limited",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            retry_after_secs=round(decision.retry_after, 3),
            peer=handle.peer,
        )

    async def _attest(self, handle: StreamHandle, event: AttestationReceived, now: float) -> None:
        node_id = handle.node_id
        assert node_id is not None
        fleet, identity = self.fleet, self.identity
        if fleet.cluster.lapsed(now):
            handle.close(grpc.StatusCode.UNAVAILABLE, LEASE_LAPSED)
            return
        node = await fleet.find(node_id)
        await identity.know_signer(handle.hello_token)
        try:
            verified = verify_attestation(
                token=handle.hello_token,
                signature=event.signature,
                nonce=event.nonce,
                protocol_version=1,
                node_id=node_id,
                verifier=identity.verifier,
                node_record=node.core_record() if node is not None else None,
                revocations=identity.revocations,
                now=now,
                host_time=handle.host_time,
            )
        except AttestationError as err:
            self.metrics.refusals.labels(reason=err.reason).inc()
            jsonlog.log(
                "warning",
                "stream.refused",
                node_id=node_id,
                tenant_id=node.tenant_id if node else None,
                reason=err.reason,
                error=err.message,
                peer=handle.peer,
            )
            handle.session.refuse(err.reason, str(err), now)
            handle.refuse(err.reason, str(err), now)
            return
        assert node is not None
        # The daemon has done its part: what follows (a token written to the store) is the
        # relay's own latency, and a slow disk must not make it cut an honest daemon.
        self.handshakes.settle(handle.id)
        self._unattested.pop(handle.id, None)
        handle.hello_token = ""
        # Attesting with a token proves the daemon stored it: that confirms it too.
        await identity.token_confirmed(node, verified.token_jti, now)
        token, expires = "", verified.token_expires_at
        if verified.token_expired or needs_refresh(
            verified.token_expires_at, now, identity.refresh_margin
        ):
            issued = await identity.issue_node_token(node)
            token, expires = issued.token, issued.claims.expires_at
        settings = self.settings
        features = grant(
            handle.session.offered_features,
            settings.features,
            keepalive_secs=handle.session.keepalive_secs,
            interval_secs=settings.heartbeat_interval,
            stale_threshold_secs=settings.stale_threshold,
        )
        handle.session.accept(
            verified,
            heartbeat_interval_secs=settings.heartbeat_interval,
            stale_threshold_secs=settings.stale_threshold,
            now=now,
            node_token=token,
            token_expires_at=expires,
            max_concurrent_commands=settings.max_concurrent_commands,
            relay_endpoints=await identity.endpoints_for_daemon(),
            features=features,
            heartbeat_ack_every=heartbeat_ack_every(
                settings.heartbeat_interval,
                settings.stale_threshold,
                keepalive=HEARTBEAT_KEEPALIVE in features,
            ),
        )
        handle.attested = True
        handle.tenant_id = node.tenant_id
        handle.connected_since = now
        fleet.stream_attested(handle, now)
        identity.token_live(node.token_expires_at)
        jsonlog.log(
            "info",
            "stream.accepted",
            node_id=node_id,
            tenant_id=node.tenant_id,
            control=handle.control,
            refreshed=bool(token),
        )
        if handle.control:
            return
        old = fleet.streams.get(node_id)
        fleet.streams[node_id] = handle
        fleet.connected_since[node_id] = now
        if old is not None and old is not handle:
            lost = old.session.connection_lost()
            old.refuse("replaced", "replaced by a newer stream of this node", now)
            if lost:
                self.dispatcher.connection_lost(node_id, lost)
        fleet.apply_transitions(fleet.health.attested(node_id, now, stream_id=handle.id))
        await fleet.cluster.hold(node_id, handle.id, fleet.status_of(node_id))
        if handle.hello_capabilities is not None:
            await self._set_capabilities(handle, handle.hello_capabilities)

    async def _set_capabilities(self, handle: StreamHandle, caps: common_pb2.Capabilities) -> None:
        node = self.fleet.nodes.get(handle.node_id or "")
        if node is None:
            return
        new = capabilities_from_proto(caps)
        if new != node.capabilities:
            node.capabilities = new
            await self._db.call(self._db.store.set_capabilities, node.node_id, new)

    async def _rotate(self, handle: StreamHandle, event: RotateKeyRequested, now: float) -> None:
        node = self.fleet.nodes[handle.node_id or ""]
        try:
            proof = RotationProof(
                new_public_key=event.new_public_key,
                old_key_signature=event.old_key_signature,
                new_key_signature=event.new_key_signature,
            )
            rotated = await self.identity.rotate(node, proof, event.nonce, now)
        except RotationError as err:
            jsonlog.log(
                "warning",
                "key.rotation_refused",
                node_id=node.node_id,
                tenant_id=node.tenant_id,
                reason=err.reason,
                error=err.message,
            )
            handle.refuse(err.reason, f"key rotation refused: {err}", now)
            return
        issued, thumbprint = rotated.issued, rotated.verified.new_key_thumbprint
        handle.session.key_rotated(issued.token, issued.claims.expires_at, thumbprint)
        live = self.fleet.streams.get(node.node_id)
        if handle.control and live is not None and live is not handle:
            # `aegis edge keys rotate` ran beside a running daemon, whose stream is still
            # attested with the old key: drain it, so the daemon finishes what runs and
            # reconnects with the new key and token from disk.
            live.session.drain("key rotated on the host", reconnect_after_secs=0.0)
            live.flush()
        jsonlog.log(
            "info",
            "key.rotated",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            key_thumbprint=thumbprint,
        )

    # ------------------------------------------------------------------ cuts

    def cut_revoked(self, node: NodeState, reason: str, now: float) -> None:
        """A committed revocation: the node goes Revoked and its streams end at once."""
        fleet = self.fleet
        fleet.apply_transitions(fleet.health.revoked(node.node_id, now))
        handle = fleet.streams.pop(node.node_id, None)
        # Popped with the stream: the stream's own end no longer finds itself in `streams`
        # and would leave a revoked host "connected since" its last attestation.
        fleet.connected_since.pop(node.node_id, None)
        if handle is not None:
            lost: list[str] = []
            with contextlib.suppress(Exception):
                lost = handle.session.revoke(reason or "revoked")
            handle.refuse("revoked", "node revoked", now)
            self.dispatcher.connection_lost(node.node_id, lost)
        # Control sessions of a revoked node go too.
        for other in list(fleet.all_streams):
            if other.node_id == node.node_id and other is not handle:
                other.refuse("revoked", "node revoked", now)

    def drop_all(self, message: str) -> int:
        """End every stream with UNAVAILABLE, so each daemon dials its next relay (this one
        lost its lease); what was in flight ends ``edge_disconnected`` or as a late result
        through the relay the daemon lands on. Returns how many streams there were."""
        streams = list(self.fleet.all_streams)
        for handle in streams:
            handle.close(grpc.StatusCode.UNAVAILABLE, message)
        return len(streams)

    async def drain(self) -> None:
        """Tell every daemon to go away and come back (:mod:`.drainer`); returns once no
        stream can touch the store, with the idle streams' ``Drain``s still to write
        (:meth:`drained`). Per-stream ``stream.closed``/``daemon.status`` lines are at debug
        level from here on; one ``relay.drained`` line sums the drain up."""
        self.fleet.draining = True
        self.fleet.arrived()  # dispatches waiting for a returning daemon stop waiting
        await self._drain.begin(
            self.fleet.all_streams,
            list(self._unattested.values()),
            self.fleet.cluster.other_endpoints(),
        )

    async def drained(self) -> None:
        """After :meth:`drain` (and the store's close): write the ``Drain``s and end the
        calls, bounded by the drain's grace."""
        await self._drain.finish(self.fleet.all_streams)
