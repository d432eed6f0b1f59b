"""The daemon's stream to the relay: dial over TLS, attest, then pump frames both ways.

Protocol state lives in :class:`aegis_edge_core.session.DaemonSession`; this module moves
its messages, keeps the heartbeat going, notices a relay that stopped answering, keeps the
node token fresh and hands commands, cancels and result acks to the parts that own them.
One :meth:`RelayLink.connect_once` is one stream, from dial to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import grpc
import grpc.aio

from aegis_edge_agent.errors import EXIT_OK, ConnectFailed, Fatal, Revoked, refusal_of, refused
from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.status import StatusBoard
from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core import daemon_rules as rules
from aegis_edge_core import hoststate as hs
from aegis_edge_core import session as s
from aegis_edge_core.backoff import Backoff
from aegis_edge_core.errors import AegisError, LocalProtocolError, ProtocolError
from aegis_edge_core.handshake import FEATURES
from aegis_edge_core.identity import NodeKey, dial_order, peek_node_token, sign_attestation
from aegis_edge_core.identity.rotation import RotationProof
from aegis_edge_core.refusals import Refusal
from aegis_edge_core.wire import common_pb2, stream_pb2, stream_pb2_grpc

__all__ = [
    "EOF",
    "Commands",
    "RelayLink",
    "Results",
    "Stream",
    "answer_challenge",
    "handshake_failed",
    "rpc_error",
]

EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the stubs do not declare it

HANDSHAKE_TIMEOUT = 15.0


def rpc_error(err: grpc.aio.AioRpcError) -> str:
    code = err.code()
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() or ""
    return f"{name}: {details}".strip().rstrip(":")


def keepalive_timed_out(err: grpc.aio.AioRpcError) -> bool:
    """The channel's keepalive ping went unanswered (grpc core ends the calls with this)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and "ping timeout" in (err.details() or "")


def handshake_failed(err: grpc.aio.AioRpcError, in_band: s.Refused | None) -> Exception:
    """Why the handshake's call ended: the status details first, else the in-band
    ``Refused`` an older relay sent, else the status itself."""
    refusal = refusal_of(err)
    if refusal is None and in_band is not None:
        refusal = _from_in_band(in_band)
    if refusal is None:
        return ConnectFailed(rpc_error(err))
    return refused(refusal)


def _from_in_band(event: s.Refused) -> Refusal:
    return Refusal(
        reason=event.reason,
        message=event.message,
        relay_time=event.relay_time,
        retry_after_secs=event.retry_after_secs,
    )


def answer_challenge(session: s.DaemonSession, key: NodeKey, node_id: str, nonce: bytes) -> None:
    """Sign the relay's nonce with the node key: the attestation every stream starts with."""
    session.attest(
        sign_attestation(key, protocol_version=PROTOCOL_VERSION, node_id=node_id, nonce=nonce)
    )


class Commands(Protocol):
    """Where the stream hands the relay's commands and cancels."""

    def __len__(self) -> int:
        """Calls running now (the heartbeat reports it)."""

    def start(self, inv: stream_pb2.CommandInvocation) -> None: ...

    def cancel(self, command_id: str, reason: str) -> None: ...


class Results(Protocol):
    """Finished results waiting for the relay's ack."""

    def __len__(self) -> int: ...

    def pending(self) -> list[stream_pb2.CommandResult]: ...

    def ack(self, command_id: str) -> bool: ...


class Stream:
    """One attested stream: its session, its call, and a single ordered writer."""

    def __init__(self, session: s.DaemonSession, call: Any) -> None:
        self.session = session
        self.call = call
        self.wake = asyncio.Event()
        self.closed = False
        self.accepted: s.SessionAccepted | None = None
        self.capabilities: common_pb2.Capabilities | None = None
        self.refresh_requested = False
        self.rotation: asyncio.Future[s.KeyRotated] | None = None
        self.end_reason = ""
        self.refused: s.Refused | None = None
        """The in-band refusal, read while waiting for the status that ends the call."""

    def kick(self) -> None:
        self.wake.set()

    async def flush(self) -> None:
        for msg in self.session.messages_to_send():
            await self.call.write(msg)

    async def writer(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            await self.flush()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.end_reason = self.end_reason or reason
            self.call.cancel()

    # What command execution sends (execution.Uplink); nothing once the stream is closing.

    @property
    def max_concurrent_commands(self) -> int:
        return self.accepted.max_concurrent_commands if self.accepted is not None else 0

    def send_result(self, result: stream_pb2.CommandResult) -> None:
        if self.closed:
            return
        try:
            self.session.result(result)
        finally:
            self.kick()

    def send_output(self, command_id: str, seq: int, stream: str, data: bytes) -> None:
        if self.closed:
            return
        self.session.output(command_id, seq, **{stream: data})
        self.kick()

    # What a key rotation runs over (rotation.RotationChannel).

    @property
    def node_id(self) -> str:
        return self.accepted.node_id if self.accepted is not None else ""

    @property
    def nonce(self) -> bytes | None:
        return self.session.nonce

    def begin_rotation(self, proof: RotationProof) -> asyncio.Future[s.KeyRotated]:
        self.rotation = asyncio.get_running_loop().create_future()
        self.session.rotate_key(
            new_public_key=proof.new_public_key,
            old_key_signature=proof.old_key_signature,
            new_key_signature=proof.new_key_signature,
        )
        self.kick()
        return self.rotation


class RelayLink:
    """Dials the relay and serves one stream at a time; :attr:`stream` is the accepted one."""

    def __init__(
        self,
        state: StateDir,
        *,
        log: EventLog,
        status: StatusBoard,
        backoff: Backoff,
        rng: random.Random,
        stop_event: asyncio.Event,
        commands: Commands,
        results: Results,
        capabilities: Callable[[], common_pb2.Capabilities],
        reload_settings: Callable[[], bool],
        stall_heartbeats: int | None = None,
    ) -> None:
        self._state = state
        self._log = log
        self._status = status
        self._backoff = backoff
        self._rng = rng
        self._stop_event = stop_event
        self._commands = commands
        self._results = results
        self._capabilities = capabilities
        self._reload_settings = reload_settings
        self._stall_heartbeats = stall_heartbeats
        self._keepalive = rules.keepalive_plan(0.0, 0.0)
        """The channel's keepalive, for the heartbeat plan the relay last handed out (it
        is fixed before the handshake: a relay with other settings grants
        heartbeat-keepalive from the stream after the first)."""
        self.stream: Stream | None = None
        self.exit_reason = ""
        self.relay = ""
        """The endpoint dialled last; after it attested, the one to come back to."""
        self._failures = 0
        """Connections that ended or failed since the last attestation (see dial_order)."""
        self._drained_to = ""
        """The relay a ``Drain`` named: the next attempt dials it (once)."""

    def _read_credentials(self) -> tuple[NodeKey, str, hs.NodeInfo, bytes]:
        state = self._state
        if not state.key_path.exists() and not state.token_path.exists():
            self.exit_reason = "logged out"
            raise Fatal(
                f"this host is logged out: no node.key or node.token in {state.path}",
                exit_code=EXIT_OK,
            )
        try:
            key = state.load_key()
            token = state.load_token()
            node = state.load_node()
            ca = state.load_ca()
        except AegisError as err:
            raise Fatal(str(err)) from None
        return key, token, node, ca

    async def connect_once(self) -> float | None:
        """Connect, attest, serve until the stream ends. Returns a delay override or None."""
        key, token, node, ca = self._read_credentials()
        self._reload_settings()
        relay = dial_order(node.endpoints, self.relay or node.relay, self._failures)
        if self._drained_to in node.endpoints:
            relay = self._drained_to  # the draining relay named who takes this daemon now
        self._drained_to = ""
        try:
            return await self._connect(relay, key, token, node, ca)
        finally:
            # ended or failed: the next attempt goes to the cluster's next relay (if any)
            self._failures += 1

    async def _connect(
        self, relay: str, key: NodeKey, token: str, node: hs.NodeInfo, ca: bytes
    ) -> float | None:
        self._status.note(relay=relay)
        self._status.set(state=hs.ConnectionState.CONNECTING, next_retry_at=None)
        self._log.info("connecting", relay=relay)
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        keepalive = self._keepalive
        options = [
            ("grpc.max_receive_message_length", s.MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
            *keepalive.channel_options(),
        ]
        async with grpc.aio.secure_channel(relay, creds, options=options) as channel:
            stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
            call = stub.Connect()
            conn = Stream(s.DaemonSession(), call)
            try:
                try:
                    await asyncio.wait_for(
                        self._handshake(conn, key, token, node, keepalive),
                        timeout=HANDSHAKE_TIMEOUT,
                    )
                except TimeoutError:
                    raise ConnectFailed("the relay did not finish the handshake in time") from None
                except grpc.aio.AioRpcError as err:
                    raise handshake_failed(err, conn.refused) from None
                except ProtocolError as err:
                    raise ConnectFailed(f"protocol error during handshake: {err}") from None
                self.relay, self._failures = relay, 0
                self._learn_endpoints(node, conn.accepted)
                return await self._serve(conn, relay)
            finally:
                conn.closed = True
                call.cancel()

    async def _read(self, conn: Stream) -> stream_pb2.RelayMessage | None:
        try:
            msg = await conn.call.read()
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() once *we* cancelled the call.
            if conn.closed:
                return None
            raise
        if msg is EOF:
            return None
        assert isinstance(msg, stream_pb2.RelayMessage)
        return msg

    async def _handshake(
        self,
        conn: Stream,
        key: NodeKey,
        token: str,
        node: hs.NodeInfo,
        keepalive: rules.KeepalivePlan,
    ) -> None:
        session = conn.session
        conn.capabilities = self._capabilities()
        session.hello(
            node_id=node.node_id,
            node_token=token,
            capabilities=conn.capabilities,
            now=time.time(),
            features=FEATURES,
            keepalive_secs=keepalive.bound_secs,
        )
        await conn.flush()
        while conn.accepted is None:
            msg = await self._read(conn)
            if msg is None:
                if conn.refused is not None:  # a relay too old to end the call with details
                    raise refused(_from_in_band(conn.refused))
                raise ConnectFailed("the relay closed the stream during the handshake")
            for event in session.receive(msg, time.time()):
                if isinstance(event, s.ChallengeReceived):
                    answer_challenge(session, key, node.node_id, event.nonce)
                    await conn.flush()
                elif isinstance(event, s.Refused):
                    # The status that ends the call carries the reason as well, in its
                    # details; that is what the loop above reads next.
                    conn.refused = event
                elif isinstance(event, s.SessionAccepted):
                    conn.accepted = event

    def _learn_endpoints(self, node: hs.NodeInfo, accepted: s.SessionAccepted | None) -> None:
        """Keep the cluster's current relay list in node.json (relays join and leave)."""
        if accepted is None or not accepted.relay_endpoints:
            return
        if set(accepted.relay_endpoints) == set(node.relays):
            return
        updated = attrs.evolve(node, relays=accepted.relay_endpoints)
        self._state.write(hs.NODE_JSON, updated.to_json())
        self._log.info("relay_endpoints_updated", relays=list(accepted.relay_endpoints))

    async def _serve(self, conn: Stream, relay: str) -> float | None:
        accepted = conn.accepted
        assert accepted is not None
        now = time.time()
        self._backoff.connected(now)
        self.stream = conn
        self._keepalive = rules.keepalive_plan(
            accepted.heartbeat_interval_secs, accepted.stale_threshold_secs
        )
        if accepted.node_token:
            self._store_token(accepted.node_token)
            self._ack_token(conn, accepted.node_token)
        token_exp = accepted.token_expires_at or self._token_expiry()
        self._status.set(
            state=hs.ConnectionState.CONNECTED,
            connected_since=now,
            heartbeat_interval_secs=accepted.heartbeat_interval_secs,
            token_expires_at=token_exp,
            last_error="",
            next_retry_at=None,
        )
        self._log.info(
            "connected",
            relay=relay,
            heartbeat_interval_secs=accepted.heartbeat_interval_secs,
            pending_results=len(self._results),
            features=list(accepted.features),
            heartbeat_ack_every=accepted.heartbeat_ack_every,
        )
        # Results that finished while no stream was up.
        for result in self._results.pending():
            conn.session.result(result)
        writer = asyncio.create_task(conn.writer())
        heart = asyncio.create_task(self._heartbeats(conn))
        conn.kick()
        delay: float | None = None
        try:
            while not conn.closed:
                try:
                    msg = await self._read(conn)
                except grpc.aio.AioRpcError as err:
                    if not conn.closed:
                        refusal = refusal_of(err)
                        conn.end_reason = rpc_error(err)
                        if keepalive_timed_out(err):
                            self._log.warning(
                                "relay_stalled",
                                heartbeats_unacked=conn.session.heartbeats_unacked,
                                detected_by="keepalive",
                            )
                            conn.end_reason = "relay stalled: keepalive ping unanswered"
                        if refusal is not None and refusal.reason == "revoked":
                            conn.end_reason = "revoked"
                        elif refusal is not None and refusal.retry_after_secs > 0:
                            delay = refusal.retry_after_secs
                    break
                if msg is None:
                    conn.end_reason = conn.end_reason or "the relay closed the stream"
                    break
                try:
                    events = conn.session.receive(msg, time.time())
                except ProtocolError as err:
                    conn.end_reason = f"protocol error: {err}"
                    break
                for event in events:
                    d = self._on_event(conn, event)
                    if d is not None:
                        delay = d
                conn.kick()
        finally:
            conn.closed = True
            conn.wake.set()
            heart.cancel()
            writer.cancel()
            for t in (heart, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if conn.rotation is not None and not conn.rotation.done():
                conn.rotation.set_exception(ConnectionError("the stream dropped during rotation"))
            self.stream = None
            self._backoff.disconnected(time.time())
            conn.session.close()
        reason = conn.end_reason or "stream ended"
        if conn.end_reason == "revoked":
            raise Revoked("the relay revoked this node")
        self._log.warning("disconnected", reason=reason, inflight=len(self._commands))
        self._status.note(last_error=reason if reason not in ("shutdown",) else "")
        return delay

    def _on_event(self, conn: Stream, event: s.Event) -> float | None:
        if isinstance(event, s.HeartbeatAcked):
            self._status.set(last_heartbeat_acked_at=time.time())
        elif isinstance(event, s.CommandReceived):
            self._commands.start(event.command)
        elif isinstance(event, s.CancelRequested):
            self._commands.cancel(event.command_id, event.reason)
        elif isinstance(event, s.ResultAcked):
            if self._results.ack(event.command_id):
                self._status.set()
        elif isinstance(event, s.TokenRefreshed):
            self._store_token(event.node_token)
            self._ack_token(conn, event.node_token)
            conn.refresh_requested = False
            self._status.set(token_expires_at=event.expires_at)
            self._log.info("token_refreshed", expires_at=event.expires_at)
        elif isinstance(event, s.KeyRotated):
            if conn.rotation is not None and not conn.rotation.done():
                conn.rotation.set_result(event)
        elif isinstance(event, s.Drained):
            self._log.info("drain", reason=event.reason, relay=event.relay_endpoint or None)
            self._drained_to = event.relay_endpoint
            conn.close(f"drained: {event.reason}")
            # jittered: every daemon of a restarting relay hears the same hint at once
            # now: the relay is restarting, not the network broken -- the schedule starts
            # again at the bottom and refused attempts in the drain window do not climb
            return self._backoff.after_drain(event.reconnect_after_secs, self._rng, time.time())
        elif isinstance(event, s.Revoked):
            conn.end_reason = "revoked"
            conn.close("revoked")
        return None

    def _token_expiry(self) -> float | None:
        claims = self._state.token_claims()
        return claims.expires_at if claims else None

    def _store_token(self, token: str) -> None:
        self._state.write(hs.NODE_TOKEN, token + "\n")

    def _ack_token(self, conn: Stream, token: str) -> None:
        """Tell the relay the token is on disk (a heartbeat naming its jti), so it can
        revoke the one it replaces. Only after ``_store_token`` returned: fsynced."""
        try:
            jti = peek_node_token(token).jti
        except AegisError:
            return  # not a token we can read; the relay will not revoke on our behalf
        conn.session.heartbeat(time.time(), inflight=len(self._commands), token_jti=jti)

    async def _heartbeats(self, conn: Stream) -> None:
        accepted = conn.accepted
        assert accepted is not None
        plan = rules.heartbeat_plan(
            accepted.heartbeat_interval_secs,
            accepted.stale_threshold_secs,
            stall_after=self._stall_heartbeats,
            ack_every=accepted.heartbeat_ack_every,
        )
        while not conn.closed:
            await asyncio.sleep(plan.interval_secs)
            session = conn.session
            if session.heartbeats_unacked >= plan.stall_after:
                self._log.warning(
                    "relay_stalled",
                    heartbeats_unacked=session.heartbeats_unacked,
                    detected_by="heartbeats",
                )
                conn.close(f"relay stalled: {session.heartbeats_unacked} heartbeats unacknowledged")
                return
            if not self._state.key_path.exists():
                self.exit_reason = "logged out"
                self._log.info("logged_out", action="stopping")
                self._stop_event.set()
                conn.close("logged out")
                return
            now = time.time()
            session.heartbeat(now, inflight=len(self._commands))
            self._maybe_refresh(conn, now)
            if self._reload_settings():
                self._log.info("config_reloaded")
            caps = self._capabilities()
            if caps != conn.capabilities:
                conn.capabilities = caps
                try:
                    session.capabilities(caps)
                except LocalProtocolError as err:
                    # keep the relay's copy as it was rather than lose the stream over it
                    self._log.error("capabilities_not_sent", error=str(err))
                else:
                    self._log.info("capabilities_changed", tools=list(caps.tools))
            conn.kick()

    def _maybe_refresh(self, conn: Stream, now: float) -> None:
        if conn.refresh_requested:
            return
        try:
            claims = peek_node_token(self._state.load_token())
        except (AegisError, OSError):
            return
        if rules.token_refresh_due(
            issued_at=claims.issued_at, expires_at=claims.expires_at, now=now
        ):
            conn.refresh_requested = True
            conn.session.request_token_refresh()
            self._log.info("token_refresh_requested", expires_at=claims.expires_at)
