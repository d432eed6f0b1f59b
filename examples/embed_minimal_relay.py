"""Embedding aegis_edge_core: a minimal relay and a tiny daemon, in one process, on loopback.

The core decides everything -- token checks, attestation, the stream protocol, health --
and this script only moves bytes and reads the clock. It shows the shape of a relay you
would build into your own service: a grpc.aio server implementing ``Enrollment.Enroll``
and ``EdgeStream.Connect`` with the generated stubs, state in memory (a real relay keeps
it in a store), plaintext gRPC on 127.0.0.1 (a real relay serves TLS and pins its CA in
the enrollment token). The daemon half enrolls, attests, heartbeats and answers one
``edge.ping``; then the relay prints the health transitions it saw.

Run it (no arguments, finishes in about a second)::

    .venv/bin/python examples/embed_minimal_relay.py
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.errors import RemoteProtocolError
from aegis_edge_core.health import HealthTracker, Transition
from aegis_edge_core.identity import (
    AttestationError,
    EnrollmentError,
    NodeKey,
    NodeRecord,
    RelaySigningKey,
    RevocationList,
    TokenIssuer,
    TokenVerifier,
    ca_pin,
    new_jti,
    peek_enrollment_token,
    redeem_enrollment,
    sign_attestation,
    sign_enrollment,
    verify_attestation,
)
from aegis_edge_core.session import (
    AttestationReceived,
    ChallengeReceived,
    CommandReceived,
    DaemonSession,
    DaemonState,
    HeartbeatAcked,
    HeartbeatReceived,
    HelloReceived,
    RelaySession,
    ResultAcked,
    ResultReceived,
    SessionAccepted,
)
from aegis_edge_core.wire import (
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)

HEARTBEAT_SECS = 0.2


class MiniRelay(enrollment_pb2_grpc.EnrollmentServicer, stream_pb2_grpc.EdgeStreamServicer):
    """Enrollment and the daemon stream over in-memory state."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.issuer = TokenIssuer(signing_key=RelaySigningKey.from_seed(os.urandom(32)))
        self.verifier = TokenVerifier.for_signing_key(self.issuer.signing_key)
        self.revocations = RevocationList()
        self.nodes: dict[str, NodeRecord] = {}
        self.redeemed: set[str] = set()
        self.health = HealthTracker(
            heartbeat_interval_secs=HEARTBEAT_SECS, stale_threshold_secs=3 * HEARTBEAT_SECS
        )
        self.streams: dict[str, tuple[RelaySession, asyncio.Queue[Any]]] = {}
        self.results: dict[str, asyncio.Future[stream_pb2.CommandResult]] = {}
        self.heartbeat_seen = asyncio.Event()

    def log_transitions(self, transitions: list[Transition]) -> None:
        for t in transitions:
            old = t.old.value if t.old else "untracked"
            print(f"relay: {t.node_id} {old} -> {t.new.value} ({t.cause.value})")

    def enrollment_token(self, tenant_id: str) -> str:
        # A TLS relay pins the sha256 of its CA certificate (DER); this one has no TLS.
        return self.issuer.issue_enrollment_token(
            tenant_id=tenant_id,
            relay_endpoint=self.endpoint,
            ca_pin=ca_pin(b"plaintext loopback example: no CA"),
            now=time.time(),
            jti=new_jti(os.urandom(16)),
        ).token

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Any
    ) -> enrollment_pb2.EnrollResponse:
        now = time.time()
        try:
            grant = redeem_enrollment(
                token=request.enrollment_token,
                public_key=request.public_key,
                proof=request.proof,
                verifier=self.verifier,
                already_redeemed=self.redeemed,
                now=now,
                revocations=self.revocations,
            )
        except EnrollmentError as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{err.reason}: {err}")
            raise  # abort() raises; this line only tells type checkers so
        node_id = f"node-{os.urandom(4).hex()}"
        # One transaction in a real store: record the jti (unique) and create the node.
        self.redeemed.add(grant.token_jti)
        self.nodes[node_id] = NodeRecord(
            node_id=node_id, tenant_id=grant.tenant_id, public_key=grant.public_key
        )
        issued = self.issuer.issue_node_token(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            key_thumbprint=grant.key_thumbprint,
            now=now,
            jti=new_jti(os.urandom(16)),
        )
        print(f"relay: enrolled {node_id} for tenant {grant.tenant_id!r}")
        return enrollment_pb2.EnrollResponse(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            node_token=issued.token,
            token_expires_at=issued.claims.expires_at,
            heartbeat_interval_secs=HEARTBEAT_SECS,
        )

    async def Connect(
        self, request_iterator: AsyncIterator[stream_pb2.DaemonMessage], context: Any
    ) -> AsyncIterator[stream_pb2.RelayMessage]:
        session = RelaySession()
        outbox: asyncio.Queue[stream_pb2.RelayMessage | None] = asyncio.Queue()
        hello: HelloReceived | None = None

        async def read() -> None:
            nonlocal hello
            try:
                async for msg in request_iterator:
                    for event in session.receive(msg, time.time()):
                        if isinstance(event, HelloReceived):
                            hello = event
                            session.challenge(os.urandom(32), time.time())
                        elif isinstance(event, AttestationReceived) and hello is not None:
                            self.attest(session, hello, event, outbox)
                        elif isinstance(event, HeartbeatReceived) and hello is not None:
                            now = time.time()
                            self.log_transitions(self.health.heartbeat(hello.node_id, now))
                            self.heartbeat_seen.set()
                        elif isinstance(event, ResultReceived):
                            # Store the result first, then ack: the daemon forgets it on ack.
                            self.results.pop(event.result.command_id).set_result(event.result)
                            session.ack_result(event.result.command_id)
                    for out in session.messages_to_send():
                        outbox.put_nowait(out)
            except RemoteProtocolError as err:
                print(f"relay: protocol error, closing the stream: {err}")
            finally:
                outbox.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (out := await outbox.get()) is not None:
                yield out
        finally:
            reader.cancel()
            if hello is not None and session.node_id in self.streams:
                session.connection_lost()  # in-flight commands would end edge_disconnected
                del self.streams[hello.node_id]
                self.log_transitions(self.health.stream_closed(hello.node_id, time.time()))

    def attest(
        self,
        session: RelaySession,
        hello: HelloReceived,
        event: AttestationReceived,
        outbox: asyncio.Queue[Any],
    ) -> None:
        now = time.time()
        try:
            verified = verify_attestation(
                token=hello.node_token,
                signature=event.signature,
                nonce=event.nonce,
                protocol_version=PROTOCOL_VERSION,
                node_id=hello.node_id,
                verifier=self.verifier,
                node_record=self.nodes.get(hello.node_id),
                revocations=self.revocations,
                now=now,
                host_time=hello.host_time or None,
            )
        except AttestationError as err:
            session.refuse(err.reason, str(err), now)
            return
        session.accept(
            verified,
            heartbeat_interval_secs=HEARTBEAT_SECS,
            stale_threshold_secs=3 * HEARTBEAT_SECS,
            now=now,
        )
        self.streams[hello.node_id] = (session, outbox)
        self.log_transitions(self.health.attested(hello.node_id, now))

    async def run_tool(self, node_id: str, tool: str) -> stream_pb2.CommandResult:
        session, outbox = self.streams[node_id]
        command_id = f"cmd-{os.urandom(4).hex()}"
        result: asyncio.Future[stream_pb2.CommandResult]
        result = self.results[command_id] = asyncio.get_running_loop().create_future()
        session.send_command(command_id=command_id, tool=tool, timeout_secs=10)
        for out in session.messages_to_send():
            outbox.put_nowait(out)
        print(f"relay: dispatched {tool} to {node_id} as {command_id}")
        return await result


async def tiny_daemon(channel: grpc.aio.Channel, enrollment_token: str) -> None:
    """Enroll, attest, heartbeat, answer edge.ping, then hang up."""
    key = NodeKey.from_seed(os.urandom(32))  # node.key; a real daemon writes it 0600
    caps = common_pb2.Capabilities(os="linux", arch="x86_64", tools=["edge.ping"])
    jti = peek_enrollment_token(enrollment_token).jti
    enrolled = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
        enrollment_pb2.EnrollRequest(
            enrollment_token=enrollment_token,
            public_key=key.public_key.raw,
            proof=sign_enrollment(key, token_jti=jti),
            capabilities=caps,
            host_time=time.time(),
        )
    )
    session = DaemonSession()
    # The generated stubs type the sync channel; grpc.aio's calls are untyped here.
    stub: Any = stream_pb2_grpc.EdgeStreamStub(channel)
    call = stub.Connect()

    async def flush() -> None:
        for out in session.messages_to_send():
            await call.write(out)

    session.hello(
        node_id=enrolled.node_id, node_token=enrolled.node_token, capabilities=caps, now=time.time()
    )
    await flush()
    async for msg in call:
        for event in session.receive(msg, time.time()):
            if isinstance(event, ChallengeReceived):
                signature = sign_attestation(
                    key,
                    protocol_version=PROTOCOL_VERSION,
                    node_id=enrolled.node_id,
                    nonce=event.nonce,
                )
                session.attest(signature)
            elif isinstance(event, SessionAccepted):
                print(f"daemon: accepted as {event.node_id}, heartbeat every {HEARTBEAT_SECS}s")
                session.heartbeat(time.time())
            elif isinstance(event, HeartbeatAcked):
                print(f"daemon: heartbeat {event.seq} acked")
            elif isinstance(event, CommandReceived) and event.command.tool == "edge.ping":
                print(f"daemon: running {event.command.tool} ({event.command.command_id})")
                session.heartbeat(time.time())  # a real daemon heartbeats on a timer
                session.result(
                    stream_pb2.CommandResult(
                        command_id=event.command.command_id,
                        outcome=common_pb2.TARGET_OUTCOME_OK,
                        error_kind=stream_pb2.ERROR_KIND_OK,
                        result_json=json.dumps({"pong": True}),
                        started_at=time.time(),
                        finished_at=time.time(),
                    )
                )
            elif isinstance(event, ResultAcked):
                print(f"daemon: result {event.command_id} acked; hanging up")
                session.close()
        if session.state is DaemonState.CLOSED:
            break
        await flush()
    await call.done_writing()
    call.cancel()


async def main() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    relay = MiniRelay(endpoint=f"127.0.0.1:{port}")
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(relay, server)
    stream_pb2_grpc.add_EdgeStreamServicer_to_server(relay, server)
    await server.start()
    print(f"relay: listening on 127.0.0.1:{port} (plaintext, loopback only)")
    token = relay.enrollment_token("acme")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        daemon = asyncio.create_task(tiny_daemon(channel, token))
        await asyncio.wait_for(relay.heartbeat_seen.wait(), timeout=10)
        node_id = next(iter(relay.streams))
        # The tracker reads no clock: a relay calls tick(now) on a timer. Passing a time
        # past the stale threshold shows what a silent daemon becomes; its next heartbeat
        # (sent with the ping's answer below) brings it back.
        relay.log_transitions(relay.health.tick(time.time() + 1.0))
        result = await asyncio.wait_for(relay.run_tool(node_id, "edge.ping"), timeout=10)
        outcome = common_pb2.TargetOutcome.Name(result.outcome).removeprefix("TARGET_OUTCOME_")
        print(f"relay: {result.command_id} ended {outcome.lower()} with {result.result_json}")
        await asyncio.wait_for(daemon, timeout=10)
        # An enrollment token is single use: the second redemption is refused.
        try:
            await asyncio.wait_for(tiny_daemon(channel, token), timeout=10)
        except grpc.aio.AioRpcError as err:
            print(f"relay: second enrollment refused: {err.details()}")
    await asyncio.sleep(0.1)  # let the stream's close reach the health tracker
    print(f"relay: final status of {node_id}: {relay.health.status(node_id)}")
    await server.stop(grace=1)


if __name__ == "__main__":
    asyncio.run(main())
