"""The relay's heart: fleet state, the daemon stream handler and the background loops.

:class:`Relay` owns everything that lives as long as the process: the store worker, the
signing key, the revocation list, the health tracker, the in-memory fleet and the live
streams. The gRPC services (:mod:`.services`) are thin adapters over its methods.

Every decision is the core's: the stream protocol (:class:`RelaySession`), attestation
(:func:`verify_attestation`), enrollment (:func:`redeem_enrollment`), rotation
(:func:`verify_rotation`), health (:class:`HealthTracker`). This module pumps bytes and
clock readings in and acts on what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import attrs
import grpc

from aegis_edge_core.capability_limits import CapabilityError, check_capabilities
from aegis_edge_core.errors import RemoteProtocolError
from aegis_edge_core.handshake import (
    DEFAULT_HANDSHAKE_DEADLINE,
    DEFAULT_MAX_UNATTESTED_PER_SOURCE,
    HandshakeGuard,
    HandshakeLimits,
    HandshakeRefusal,
)
from aegis_edge_core.health import DaemonStatus, HealthTracker, Transition
from aegis_edge_core.identity import (
    NODE_TOKEN_TTL,
    AttestationError,
    EnrollmentError,
    IssuedToken,
    NodeClaims,
    RelaySigningKey,
    RevocationList,
    RotationError,
    TokenIssuer,
    TokenVerifier,
    ca_pin,
    load_relay_signing_key,
    new_jti,
    verify_attestation,
)
from aegis_edge_core.identity.enrollment import EnrollmentGrant, redeem_enrollment
from aegis_edge_core.identity.rotation import (
    RotationProof,
    TokenSuccession,
    needs_refresh,
    verify_rotation,
)
from aegis_edge_core.ratelimit import (
    ATTEST_PER_NODE,
    ATTEST_PER_SOURCE,
    ENROLL_PER_SOURCE,
    REFRESH_PER_NODE,
    AttemptLimits,
    Decision,
    KeyedLimiter,
    Limit,
    source_of,
)
from aegis_edge_core.session import (
    MAX_MESSAGE_BYTES,
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
from aegis_edge_core.wire import common_pb2, enrollment_pb2
from aegis_edge_relay import jsonlog
from aegis_edge_relay.dispatcher import Dispatcher
from aegis_edge_relay.files import atomic_write
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.state import (
    CloseStream,
    NodeState,
    StreamHandle,
    capabilities_from_proto,
)
from aegis_edge_relay.store import (
    NodeRecord,
    StoreError,
    StoreUnavailable,
    StoreWorker,
    TokenAlreadyRedeemed,
    open_store,
)

__all__ = ["Relay", "RelayConfig", "load_or_create_signing_key"]

SIGNING_KEY_FILE: Final = "relay-signing.key"

_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

_PROTOCOL_REASONS: Final = {
    "INVALID_ARGUMENT": "malformed",
    "FAILED_PRECONDITION": "out_of_order",
    "RESOURCE_EXHAUSTED": "oversized",
}


def _status_code(name: str) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, name, grpc.StatusCode.INVALID_ARGUMENT)
    return code


@attrs.define(kw_only=True)
class RelayConfig:
    data_dir: Path
    store_url: str | None = None
    """``--store``: None is SQLite in the data dir (see ``store.open_store``)."""
    heartbeat_interval: float = 30.0
    stale_threshold: float = 90.0
    node_token_ttl: float = NODE_TOKEN_TTL
    relay_endpoint: str = ""
    """What enrollment tokens tell hosts to connect to (``host:port``)."""
    max_concurrent_commands: int = 16
    heartbeat_flush_interval: float = 2.0
    drain_grace: float = 5.0
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


def _limiter(limit: Limit | None) -> KeyedLimiter | None:
    return KeyedLimiter(limit) if limit is not None else None


def load_or_create_signing_key(data_dir: Path) -> RelaySigningKey:
    """The relay's Ed25519 signing key (PKCS#8 PEM, 0600), made on first start."""
    path = data_dir / SIGNING_KEY_FILE
    if path.exists():
        return load_relay_signing_key(path.read_bytes(), source=str(path))
    key = RelaySigningKey.from_seed(os.urandom(32))
    atomic_write(path, key.to_pem(), mode=0o600)
    return key


class Relay:
    """Everything the relay process holds; one per process (or per test)."""

    def __init__(self, config: RelayConfig, *, ca_der: bytes | None = None) -> None:
        self.config = config
        self.signing_key = load_or_create_signing_key(config.data_dir)
        self.issuer = TokenIssuer(signing_key=self.signing_key)
        self.verifier = TokenVerifier.for_signing_key(self.signing_key)
        self.ca_pin = ca_pin(ca_der) if ca_der else "0" * 64
        self.metrics = RelayMetrics()
        self.store = open_store(config.store_url, config.data_dir)
        self.db = StoreWorker(self.store)
        self.health = HealthTracker(
            stale_threshold_secs=config.stale_threshold,
            heartbeat_interval_secs=config.heartbeat_interval,
        )
        self.revocations = RevocationList()
        self.nodes: dict[str, NodeState] = {}
        self.streams: dict[str, StreamHandle] = {}
        """The live *daemon* stream of each node (control sessions are not listed)."""
        self.connected_since: dict[str, float] = {}
        self._pending_heartbeats: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._all_streams: set[StreamHandle] = set()
        self._attested_count = 0
        """Open attested streams (control ones too): stream-seconds accrue at this rate."""
        self._seconds_accounted_at = 0.0
        self._next_refresh_scan = 0.0
        """No live stream's token needs a refresh before this time (skip the scan)."""
        self.draining = False
        self.dispatcher = Dispatcher(self)
        self.attest_limits = AttemptLimits(
            per_source=_limiter(config.attest_limit_per_source),
            per_node=_limiter(config.attest_limit_per_node),
        )
        self.enroll_limits = AttemptLimits(per_source=_limiter(config.enroll_limit_per_source))
        self.refresh_limit = _limiter(config.refresh_limit_per_node)
        self.handshakes = HandshakeGuard(
            HandshakeLimits(
                deadline_secs=config.handshake_timeout,
                max_unattested_per_source=config.max_unattested_per_source,
            )
        )
        self._unattested: dict[int, StreamHandle] = {}
        """The streams the guard holds a deadline for, by stream id."""
        self._handshake_wake = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def now() -> float:
        return time.time()

    async def start(self) -> None:
        records = await self.db.call(self.store.load_nodes)
        tokens, keys = await self.db.call(self.store.load_revocations)
        self.revocations = RevocationList.from_entries(tokens=tokens, keys=keys)
        for rec in records:
            node = NodeState.from_record(rec)
            self.nodes[rec.node_id] = node
            self.health.load(
                rec.node_id,
                DaemonStatus.REVOKED if rec.revoked else DaemonStatus.DISCONNECTED,
                rec.last_heartbeat_at,
            )
        self._reset_daemon_gauge()
        await self.dispatcher.start()
        loop = asyncio.get_running_loop()
        for coro in (
            self._sweep_loop(),
            self._flush_loop(),
            self._maintenance_loop(),
            self._handshake_loop(),
        ):
            self._tasks.append(loop.create_task(coro))
        jsonlog.log("info", "relay.started", daemons=len(self.nodes))

    def _reset_daemon_gauge(self) -> None:
        pairs = []
        for node_id, node in self.nodes.items():
            status = self.health.status(node_id)
            if status is not None:
                pairs.append((node.tenant_id, status.value))
        self.metrics.set_daemon_counts(pairs)

    async def drain(self) -> None:
        """Tell every daemon to go away and come back, and wait (bounded) for them.

        Per-stream ``stream.closed``/``daemon.status`` lines are at debug level from here
        on; one ``relay.drained`` line sums the drain up."""
        self.draining = True
        started = time.monotonic()
        total = len(self._all_streams)
        for handle in list(self._all_streams):
            with contextlib.suppress(Exception):
                if handle.attested and not handle.control:
                    handle.session.drain("relay shutting down", reconnect_after_secs=1.0)
                    handle.flush()
                    if not handle.session.in_flight:
                        # Nothing to wait for: end the call after the Drain (status OK)
                        # rather than wait for the daemon to hang up; 10k streams then
                        # close at the relay's pace, not at their hosts'.
                        handle.close()
        deadline = time.monotonic() + self.config.drain_grace
        while self._all_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = list(self._all_streams)
        for handle in cut:
            handle.close(grpc.StatusCode.UNAVAILABLE, "relay shutting down")
        jsonlog.log(
            "info",
            "relay.drained",
            streams=total,
            cut_at_grace=len(cut),
            seconds=round(time.monotonic() - started, 3),
        )

    async def stop(self) -> None:
        await self.dispatcher.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush_heartbeats()
        self._account_stream_seconds(self.now())
        self.db.close()
        jsonlog.log("info", "relay.stopped")

    # ------------------------------------------------------------------ background loops

    async def _sweep_loop(self) -> None:
        """The one health sweep: ``tick(now)`` at the next deadline (no per-daemon timers)."""
        step = max(0.05, min(1.0, self.config.stale_threshold / 4))
        while True:
            now = self.now()
            self.apply_transitions(self.health.tick(now))
            deadline = self.health.next_deadline()
            wait = step if deadline is None else min(step, max(0.01, deadline - now + 0.001))
            await asyncio.sleep(wait)

    async def _handshake_loop(self) -> None:
        """Close the streams that did not attest in time, at the guard's next deadline
        (one timer for all of them; idle while no stream is mid-handshake)."""
        while True:
            deadline = self.handshakes.next_deadline()
            if deadline is None:
                self._handshake_wake.clear()
                await self._handshake_wake.wait()
                continue
            delay = deadline - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            for refusal in self.handshakes.expire(self.now()):
                handle = self._unattested.pop(refusal.stream_id, None)
                if handle is None or handle.closing:
                    continue
                self._count_handshake_refusal(refusal, handle.peer, handle.node_id)
                handle.close(_status_code(refusal.grpc_status), refusal.message)

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

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_flush_interval)
            try:
                await self._flush_heartbeats()
            except Exception as err:  # the loop must survive a busy disk
                jsonlog.log("error", "store.flush_failed", error=str(err))

    async def _flush_heartbeats(self) -> None:
        if not self._pending_heartbeats:
            return
        beats, self._pending_heartbeats = self._pending_heartbeats, {}
        try:
            await self.db.call(self.store.flush_heartbeats, beats)
        except Exception:
            # Keep them for the next flush (newer beats that came in meanwhile win).
            self._pending_heartbeats = {**beats, **self._pending_heartbeats}
            raise

    async def _maintenance_loop(self) -> None:
        """Slow chores: stream-seconds accounting, token refresh pushes, pruning."""
        last_prune = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self.now()
            self._account_stream_seconds(now)
            if now >= self._next_refresh_scan:
                await self._refresh_tokens(now)
            if now - last_prune > 3600:
                last_prune = now
                self.revocations.prune(now)
                try:
                    await self.db.call(self.store.prune_revocations, now)
                except Exception as err:  # a busy disk must not end the loop for good
                    last_prune = now - 3600 + 60  # try again in a minute
                    jsonlog.log("error", "store.prune_failed", error=str(err))

    async def _refresh_tokens(self, now: float) -> None:
        """Push fresh tokens to live daemons whose token is within the margin of expiry.

        A scan of every stream, but only when the earliest expiry says one is due (with 10k
        streams a scan every second was most of the relay's idle CPU)."""
        margin = self._refresh_margin()
        soonest = now + 60.0
        for handle in list(self.streams.values()):
            node = self.nodes.get(handle.node_id or "")
            if node is None or handle.closing:
                continue
            if needs_refresh(node.token_expires_at, now, margin):
                with contextlib.suppress(Exception):
                    issued = await self.issue_node_token(node)
                    handle.session.refresh_token(issued.token, issued.claims.expires_at)
                    handle.flush()
            if needs_refresh(node.token_expires_at, now, margin):
                soonest = now + 1.0  # the refresh failed: try again in a second
            else:
                soonest = min(soonest, node.token_expires_at - margin)
        self._next_refresh_scan = soonest

    def _refresh_margin(self) -> float:
        return min(3600.0, self.config.node_token_ttl / 4)

    def _account_stream_seconds(self, now: float) -> None:
        """O(1): every open attested stream accrues one second per second."""
        if self._attested_count and self._seconds_accounted_at:
            self.metrics.stream_seconds.inc(
                self._attested_count * max(0.0, now - self._seconds_accounted_at)
            )
        self._seconds_accounted_at = now

    # ------------------------------------------------------------------ health plumbing

    def apply_transitions(self, transitions: Iterable[Transition]) -> None:
        for t in transitions:
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

    def status_of(self, node_id: str) -> DaemonStatus:
        return self.health.status(node_id) or DaemonStatus.DISCONNECTED

    # ------------------------------------------------------------------ tokens

    async def issue_node_token(self, node: NodeState) -> IssuedToken[NodeClaims]:
        """A fresh node token bound to the node's current key, recorded in the store."""
        issued = self.issuer.issue_node_token(
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            key_thumbprint=node.key_thumbprint,
            now=self.now(),
            jti=new_jti(os.urandom(16)),
            ttl=self.config.node_token_ttl,
        )
        await self.db.call(
            self.store.set_token, node.node_id, issued.claims.jti, issued.claims.expires_at
        )
        node.token_jti = issued.claims.jti
        node.token_expires_at = issued.claims.expires_at
        node.tokens.issued(issued.claims.jti, expires_at=issued.claims.expires_at)
        return issued

    async def _token_confirmed(self, node: NodeState, jti: str, now: float) -> None:
        """The daemon holds the token ``jti``: revoke the ones issued to it before.

        Only now, not when the new token was sent: a daemon that crashed before storing it
        would otherwise be left holding nothing the relay honours. Each entry outlives the
        token's expiry by an hour, as every other revocation does, so the verifier's clock
        leeway never reopens a window for it."""
        superseded = node.tokens.confirmed(jti)
        if not superseded:
            return
        for old_jti, expires_at in superseded:
            prune_after = max(expires_at, now) + 3600
            await self.db.call(self.store.revoke_token, old_jti, prune_after=prune_after, now=now)
            self.revocations.revoke_token(old_jti, prune_after=prune_after)
        jsonlog.log(
            "info",
            "token.superseded",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            revoked=len(superseded),
        )

    def issue_enrollment_token(self, tenant_id: str, ttl: float) -> tuple[str, float]:
        issued = self.issuer.issue_enrollment_token(
            tenant_id=tenant_id,
            relay_endpoint=self.config.relay_endpoint or "localhost:7443",
            ca_pin=self.ca_pin,
            now=self.now(),
            jti=new_jti(os.urandom(16)),
            ttl=ttl,
        )
        jsonlog.log("info", "enrollment.token_issued", tenant_id=tenant_id)
        return issued.token, issued.claims.expires_at

    # ------------------------------------------------------------------ enrollment

    async def enroll(self, req: enrollment_pb2.EnrollRequest) -> enrollment_pb2.EnrollResponse:
        """Redeem an enrollment token; raises ``EnrollmentError`` or ``StoreError``."""
        now = self.now()
        try:
            # Before the token: a refused snapshot must not cost the host its token.
            check_capabilities(req.capabilities)
        except CapabilityError as err:
            raise EnrollmentError(
                f"capability snapshot refused: {err.message}",
                reason="malformed",
                hint=err.hint or "enroll with fewer or shorter labels",
            ) from None
        grant: EnrollmentGrant = redeem_enrollment(
            token=req.enrollment_token,
            public_key=req.public_key,
            proof=req.proof,
            verifier=self.verifier,
            already_redeemed=lambda _jti: False,  # the store's unique jti decides, atomically
            now=now,
            revocations=self.revocations,
        )
        node_id = "n-" + os.urandom(8).hex()
        issued = self.issuer.issue_node_token(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            key_thumbprint=grant.key_thumbprint,
            now=now,
            jti=new_jti(os.urandom(16)),
            ttl=self.config.node_token_ttl,
        )
        record = NodeRecord(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            public_key=grant.public_key,
            key_thumbprint=grant.key_thumbprint,
            enrolled_at=now,
            capabilities=capabilities_from_proto(req.capabilities),
            token_jti=issued.claims.jti,
            token_expires_at=issued.claims.expires_at,
        )
        try:
            await self.db.call(
                self.store.enroll,
                jti=grant.token_jti,
                token_expires_at=grant.token_expires_at,
                node=record,
            )
        except TokenAlreadyRedeemed:
            raise EnrollmentError(
                "this enrollment token has already been used", reason="replayed"
            ) from None
        except StoreUnavailable:
            raise
        except StoreError as err:
            raise EnrollmentError(err.message, reason="wrong_tenant", hint=err.hint) from None
        self.nodes[node_id] = NodeState.from_record(record)
        self.health.load(node_id, DaemonStatus.DISCONNECTED)
        self.metrics.daemon_moved(grant.tenant_id, None, DaemonStatus.DISCONNECTED.value)
        jsonlog.log("info", "enrollment.redeemed", node_id=node_id, tenant_id=grant.tenant_id)
        return enrollment_pb2.EnrollResponse(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            node_token=issued.token,
            token_expires_at=issued.claims.expires_at,
            heartbeat_interval_secs=self.config.heartbeat_interval,
        )

    # ------------------------------------------------------------------ revocation

    async def revoke_node(self, node_id: str, reason: str) -> NodeState:
        now = self.now()
        node = self.nodes[node_id]
        rec = await self.db.call(
            self.store.revoke_node,
            node_id,
            reason=reason,
            now=now,
            token_prune_after=now + self.config.node_token_ttl + 3600,
        )
        self._after_revoke(node, rec.revoked_reason, now)
        jsonlog.log("warning", "node.revoked", node_id=node_id, tenant_id=node.tenant_id)
        return node

    async def delete_tenant(self, tenant_id: str) -> int:
        now = self.now()
        revoked = await self.db.call(
            self.store.delete_tenant,
            tenant_id,
            reason="tenant deleted",
            now=now,
            token_prune_after=now + self.config.node_token_ttl + 3600,
        )
        for node_id in revoked:
            node = self.nodes.get(node_id)
            if node is not None:
                self._after_revoke(node, "tenant deleted", now)
        jsonlog.log("warning", "tenant.deleted", tenant_id=tenant_id, revoked=len(revoked))
        return len(revoked)

    def _after_revoke(self, node: NodeState, reason: str, now: float) -> None:
        """Mirror a committed revocation: memory, revocation list, health, live stream."""
        node.revoked = True
        node.revoked_reason = reason
        self.revocations.revoke_key(node.key_thumbprint)
        if node.token_jti:
            self.revocations.revoke_token(node.token_jti, prune_after=node.token_expires_at + 3600)
        self.apply_transitions(self.health.revoked(node.node_id, now))
        handle = self.streams.pop(node.node_id, None)
        if handle is not None:
            lost: list[str] = []
            with contextlib.suppress(Exception):
                lost = handle.session.revoke(reason or "revoked")
            handle.close()
            self.dispatcher.connection_lost(node.node_id, lost)
        # Control sessions of a revoked node go too.
        for other in list(self._all_streams):
            if other.node_id == node.node_id and other is not handle:
                other.close(grpc.StatusCode.PERMISSION_DENIED, "node revoked")

    # ------------------------------------------------------------------ the daemon stream

    async def connect(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """``EdgeStream.Connect``: one task writes the outbox, one reads and decides."""
        handle = StreamHandle(peer=context.peer(), max_message_bytes=self.config.max_message_bytes)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "relay is shutting down")
        refusal = self.handshakes.admit(handle.id, source=source_of(handle.peer), now=self.now())
        if refusal is not None:
            self._count_handshake_refusal(refusal, handle.peer, None)
            await context.abort(_status_code(refusal.grpc_status), refusal.message)
        self._unattested[handle.id] = handle
        self._handshake_wake.set()
        self._all_streams.add(handle)
        reader = asyncio.get_running_loop().create_task(self._read_loop(handle, context))
        close: CloseStream | None = None
        try:
            while True:
                item = await handle.outbox.get()
                if isinstance(item, CloseStream):
                    close = item
                    break
                await context.write(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._stream_gone(handle)
        if close is not None and close.code is not None:
            await context.abort(close.code, close.details)

    async def _read_loop(
        self, handle: StreamHandle, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
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
            handle.close(_status_code(err.grpc_status), str(err))
        except StoreUnavailable as err:
            jsonlog.log("error", "stream.store_unavailable", node_id=handle.node_id, error=str(err))
            handle.close(grpc.StatusCode.UNAVAILABLE, "relay store unavailable; retry later")
        except asyncio.CancelledError:
            raise
        except Exception as err:
            jsonlog.log(
                "error", "stream.failed", node_id=handle.node_id, error=repr(err), peer=handle.peer
            )
            handle.close(grpc.StatusCode.INTERNAL, "relay error")

    def _stream_gone(self, handle: StreamHandle) -> None:
        self._all_streams.discard(handle)
        self.handshakes.settle(handle.id)
        self._unattested.pop(handle.id, None)
        now = self.now()
        if handle.attested and handle.accounted_at:
            self._account_stream_seconds(now)
            self._attested_count -= 1
            handle.accounted_at = 0.0
        if not handle.attested or handle.control or handle.node_id is None:
            return
        lost = handle.session.connection_lost()
        if lost:
            self.dispatcher.connection_lost(handle.node_id, lost)
        if self.streams.get(handle.node_id) is handle:
            del self.streams[handle.node_id]
            self.connected_since.pop(handle.node_id, None)
        self.apply_transitions(self.health.stream_closed(handle.node_id, now, stream_id=handle.id))
        jsonlog.log(
            "debug" if self.draining else "info",
            "stream.closed",
            node_id=handle.node_id,
            tenant_id=handle.tenant_id,
            seconds=round(now - handle.connected_since, 3),
        )

    async def _on_event(self, handle: StreamHandle, event: Event) -> None:
        now = self.now()
        if isinstance(event, HeartbeatReceived):
            node_id = handle.node_id
            assert node_id is not None
            if handle.control:
                return
            self.apply_transitions(self.health.heartbeat(node_id, now))
            self._pending_heartbeats[node_id] = now
            self.metrics.heartbeats.labels(tenant=handle.tenant_id or "").inc()
            if event.token_jti:
                node = self.nodes.get(node_id)
                if node is not None:
                    await self._token_confirmed(node, event.token_jti, now)
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
            await self.dispatcher.on_result(handle.node_id, event.result, known=event.known)
            handle.session.ack_result(event.result.command_id)
        elif isinstance(event, OutputReceived):
            assert handle.node_id is not None
            self.dispatcher.on_output(handle.node_id, event)
        elif isinstance(event, CapabilitiesChanged):
            await self._set_capabilities(handle, event.capabilities)
        elif isinstance(event, TokenRefreshRequested):
            node = self.nodes[handle.node_id or ""]
            if self.refresh_limit is not None:
                decision = self.refresh_limit.take(node.node_id, now)
                if not decision.allowed:
                    self._refresh_limited(handle, node, decision)
                    return
            issued = await self.issue_node_token(node)
            self.metrics.token_refreshes.labels(result="issued").inc()
            handle.session.refresh_token(issued.token, issued.claims.expires_at)
        elif isinstance(event, RotateKeyRequested):
            await self._rotate(handle, event, now)

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
        handle.session.refuse(
            "rate_limited",
            f"too many connection attempts; retry in {retry:g}s",
            now,
            retry_after_secs=retry,
        )
        handle.close()

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

    def check_enroll_rate(self, peer: str) -> Decision:
        """May this peer try to enroll now? (Counts the attempt when it may.)"""
        return self.enroll_limits.check(self.now(), source=source_of(peer))

    async def _attest(self, handle: StreamHandle, event: AttestationReceived, now: float) -> None:
        node_id = handle.node_id
        assert node_id is not None
        node = self.nodes.get(node_id)
        try:
            verified = verify_attestation(
                token=handle.hello_token,
                signature=event.signature,
                nonce=event.nonce,
                protocol_version=1,
                node_id=node_id,
                verifier=self.verifier,
                node_record=node.core_record() if node is not None else None,
                revocations=self.revocations,
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
            handle.close()
            return
        assert node is not None
        # The daemon has done its part: what follows (a token written to the store) is the
        # relay's own latency, and a slow disk must not make it cut an honest daemon.
        self.handshakes.settle(handle.id)
        self._unattested.pop(handle.id, None)
        handle.hello_token = ""
        # Attesting with a token proves the daemon stored it: that confirms it too.
        await self._token_confirmed(node, verified.token_jti, now)
        token, expires = "", verified.token_expires_at
        if verified.token_expired or needs_refresh(
            verified.token_expires_at, now, self._refresh_margin()
        ):
            issued = await self.issue_node_token(node)
            token, expires = issued.token, issued.claims.expires_at
        handle.session.accept(
            verified,
            heartbeat_interval_secs=self.config.heartbeat_interval,
            stale_threshold_secs=self.config.stale_threshold,
            now=now,
            node_token=token,
            token_expires_at=expires,
            max_concurrent_commands=self.config.max_concurrent_commands,
        )
        handle.attested = True
        handle.tenant_id = node.tenant_id
        handle.connected_since = now
        self._account_stream_seconds(now)
        self._attested_count += 1
        handle.accounted_at = now
        self._next_refresh_scan = min(
            self._next_refresh_scan, node.token_expires_at - self._refresh_margin()
        )
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
        old = self.streams.get(node_id)
        self.streams[node_id] = handle
        self.connected_since[node_id] = now
        if old is not None and old is not handle:
            lost = old.session.connection_lost()
            old.close(grpc.StatusCode.ABORTED, "replaced by a newer stream of this node")
            if lost:
                self.dispatcher.connection_lost(node_id, lost)
        self.apply_transitions(self.health.attested(node_id, now, stream_id=handle.id))
        if handle.hello_capabilities is not None:
            await self._set_capabilities(handle, handle.hello_capabilities)

    async def _set_capabilities(self, handle: StreamHandle, caps: common_pb2.Capabilities) -> None:
        node = self.nodes.get(handle.node_id or "")
        if node is None:
            return
        new = capabilities_from_proto(caps)
        if new != node.capabilities:
            node.capabilities = new
            await self.db.call(self.store.set_capabilities, node.node_id, new)

    async def _rotate(self, handle: StreamHandle, event: RotateKeyRequested, now: float) -> None:
        node = self.nodes[handle.node_id or ""]
        try:
            verified = verify_rotation(
                proof=RotationProof(
                    new_public_key=event.new_public_key,
                    old_key_signature=event.old_key_signature,
                    new_key_signature=event.new_key_signature,
                ),
                node_id=node.node_id,
                old_public_key=node.public_key,
                nonce=event.nonce,
                revocations=self.revocations,
            )
        except RotationError as err:
            jsonlog.log(
                "warning",
                "key.rotation_refused",
                node_id=node.node_id,
                tenant_id=node.tenant_id,
                reason=err.reason,
                error=err.message,
            )
            handle.close(grpc.StatusCode.PERMISSION_DENIED, f"key rotation refused: {err}")
            return
        old_jti, old_exp = node.token_jti, node.token_expires_at
        issued = self.issuer.issue_node_token(
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            key_thumbprint=verified.new_key_thumbprint,
            now=now,
            jti=new_jti(os.urandom(16)),
            ttl=self.config.node_token_ttl,
        )
        await self.db.call(
            self.store.rotate_key,
            node.node_id,
            old_thumbprint=verified.old_key_thumbprint,
            new_public_key=verified.new_public_key,
            new_thumbprint=verified.new_key_thumbprint,
            new_jti=issued.claims.jti,
            new_expires_at=issued.claims.expires_at,
            old_jti_prune_after=max(old_exp, now) + 3600,
            now=now,
        )
        node.public_key = verified.new_public_key
        node.key_thumbprint = verified.new_key_thumbprint
        node.token_jti = issued.claims.jti
        node.token_expires_at = issued.claims.expires_at
        # every earlier token is bound to the old key, now on the revocation list
        node.tokens = TokenSuccession.starting_with(
            issued.claims.jti, expires_at=issued.claims.expires_at
        )
        if old_jti:
            self.revocations.revoke_token(old_jti, prune_after=max(old_exp, now) + 3600)
        self.revocations.revoke_key(verified.old_key_thumbprint)
        handle.session.key_rotated(
            issued.token, issued.claims.expires_at, verified.new_key_thumbprint
        )
        live = self.streams.get(node.node_id)
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
            key_thumbprint=verified.new_key_thumbprint,
        )
