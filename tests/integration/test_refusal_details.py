"""Refusals, machine-readable: every refusal that ends an RPC with a non-OK status carries
its reason in the status details (``grpc-status-details-bin``: a ``google.rpc.Status``
whose details[0] packs ``aegis.edge.v1.Refused``), with the status code of the core's
table, against a real relay over TLS; and the real daemon stops on REVOKED read there.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_status import rpc_status

from aegis_edge_core import PROTOCOL_VERSION
from aegis_edge_core.identity import NodeKey, sign_attestation
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.identity.tokens import peek_enrollment_token
from aegis_edge_core.refusals import REFUSAL_STATUS, Refusal, reason_name, refusal_from_status
from aegis_edge_core.wire import (
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
Answer = Callable[[stream_pb2.RelayMessage], stream_pb2.DaemonMessage | None]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(
        tmp_path_factory.mktemp("relay"),
        extra=["--handshake-timeout", "2s", "--max-unattested-per-source", "2"],
    )
    yield proc
    proc.stop()


def decoded(err: grpc.RpcError) -> Refusal:
    """The refusal in the status details; the details agree with the call's own status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]  # raises if they disagree
    assert status is not None, f"no status details: {err}"
    refusal = refusal_from_status(status)
    assert refusal is not None, f"details without a Refused: {status}"
    code = err.code().name  # type: ignore[attr-defined]
    if refusal.reason != "protocol_error":  # a violation keeps the session's finer code
        assert code == REFUSAL_STATUS[refusal.reason], (refusal, code)
    assert refusal.message == err.details()  # type: ignore[attr-defined]
    assert refusal.relay_time > 0
    return refusal


# --------------------------------------------------------------------------- enrollment


def _enroll(relay: RelayProcess, token: str, key: NodeKey) -> enrollment_pb2.EnrollResponse:
    try:
        jti = peek_enrollment_token(token).jti
    except Exception:
        jti = "x"
    request = enrollment_pb2.EnrollRequest(
        enrollment_token=token,
        public_key=key.public_key.raw,
        proof=sign_enrollment(key, token_jti=jti),
        capabilities=common_pb2.Capabilities(os="linux", arch="x86_64", tools=["edge.ping"]),
    )
    creds = grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
    with grpc.secure_channel(relay.endpoint, creds) as channel:
        answer: enrollment_pb2.EnrollResponse = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            request, timeout=15
        )
    return answer


def _refused_enrollment(relay: RelayProcess, token: str) -> Refusal:
    with pytest.raises(grpc.RpcError) as err:
        _enroll(relay, token, NodeKey.from_seed(os.urandom(32)))
    return decoded(err.value)


def test_enrollment_refusals_carry_their_reason(relay: RelayProcess) -> None:
    token = relay.enrollment_token("acme")
    _enroll(relay, token, NodeKey.from_seed(os.urandom(32)))
    replayed = _refused_enrollment(relay, token)
    assert replayed.reason == "replayed"
    assert _refused_enrollment(relay, "not-a-token").reason == "malformed"
    # an operator token is a real token of this relay, for another audience
    assert _refused_enrollment(relay, relay.operator_token).reason in {
        "wrong_audience",
        "malformed",
    }


# --------------------------------------------------------------------------- the stream


def _host(relay: RelayProcess) -> tuple[NodeKey, str, str]:
    key = NodeKey.from_seed(os.urandom(32))
    answer = _enroll(relay, relay.enrollment_token("acme"), key)
    return key, answer.node_id, answer.node_token


def _hello(
    node_id: str, token: str, version: int = PROTOCOL_VERSION, host_time: float = 0.0
) -> stream_pb2.DaemonMessage:
    return stream_pb2.DaemonMessage(
        hello=stream_pb2.Hello(
            protocol_version=version,
            node_id=node_id,
            node_token=token,
            capabilities=common_pb2.Capabilities(os="linux", arch="x86_64", tools=["edge.ping"]),
            host_time=host_time,
        )
    )


def _attest(key: NodeKey, node_id: str) -> Answer:
    def answer(msg: stream_pb2.RelayMessage) -> stream_pb2.DaemonMessage | None:
        if msg.WhichOneof("body") != "challenge":
            return None
        signature = sign_attestation(
            key, protocol_version=PROTOCOL_VERSION, node_id=node_id, nonce=msg.challenge.nonce
        )
        return stream_pb2.DaemonMessage(
            attestation=stream_pb2.AttestationResponse(signature=signature)
        )

    return answer


class Call:
    """One ``EdgeStream.Connect`` call: what the relay sent, and how the call ended."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call: Any = stream_pb2_grpc.EdgeStreamStub(channel).Connect()
        self.got: list[stream_pb2.RelayMessage] = []
        self.error: grpc.aio.AioRpcError | None = None

    async def send(self, msg: stream_pb2.DaemonMessage) -> None:
        """Write. The relay may already have ended the call (a refusal at open can beat the
        first write): the failed write may then carry grpc's own error ("Internal error from
        Core") instead of the relay's status, so keep the status the call ended with."""
        try:
            await self.call.write(msg)
        except grpc.aio.AioRpcError:
            call = self.call
            self.error = grpc.aio.AioRpcError(
                await call.code(),
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
            )

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("body")) for m in self.got]

    async def until(self, kind: str | None = None, answer: Answer | None = None) -> None:
        """Read (answering as told) until a ``kind`` message, or the call's end."""
        while self.error is None:
            try:
                msg = await asyncio.wait_for(self.call.read(), 30)
            except grpc.aio.AioRpcError as err:
                self.error = err
                return
            assert msg is not EOF, f"the call ended OK after {self.kinds()}"
            self.got.append(msg)
            reply = answer(msg) if answer is not None else None
            if reply is not None:
                await self.call.write(reply)
            if kind is not None and msg.WhichOneof("body") == kind:
                return

    async def ended(self, answer: Answer | None = None) -> Refusal:
        await self.until(None, answer)
        assert self.error is not None
        return decoded(self.error)


def _stream_scenario(relay: RelayProcess, body: Callable[[grpc.aio.Channel], Any]) -> None:
    async def main() -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=relay.ca_pem)
        async with grpc.aio.secure_channel(relay.endpoint, creds) as channel:
            await body(channel)

    asyncio.run(main())


def test_stream_refusals_carry_their_reason(relay: RelayProcess) -> None:
    key, node_id, token = _host(relay)
    revoked_key, revoked_id, revoked_token = _host(relay)
    relay.revoke(revoked_id)

    async def body(channel: grpc.aio.Channel) -> None:
        # attestation refused: the in-band Refused, then the same reason in the details
        call = Call(channel)
        await call.call.write(_hello(revoked_id, revoked_token))
        refusal = await call.ended(_attest(revoked_key, revoked_id))
        assert refusal.reason == "revoked"
        assert call.kinds() == ["challenge", "refused"]
        in_band = call.got[-1].refused
        assert (reason_name(in_band.reason), in_band.message) == ("revoked", refusal.message)

        # signed with a key that is not the node's
        call = Call(channel)
        await call.call.write(_hello(node_id, token))
        refusal = await call.ended(_attest(NodeKey.from_seed(os.urandom(32)), node_id))
        assert refusal.reason in {"bad_signature", "key_mismatch"}
        assert reason_name(call.got[-1].refused.reason) == refusal.reason

        # a host clock an hour behind
        call = Call(channel)
        await call.call.write(_hello(node_id, token, host_time=time.time() - 3600))
        assert (await call.ended(_attest(key, node_id))).reason == "clock_skew"

        # another protocol version; a message out of order
        call = Call(channel)
        await call.call.write(_hello(node_id, token, version=PROTOCOL_VERSION + 6))
        assert (await call.ended()).reason == "unsupported_version"
        call = Call(channel)
        await call.call.write(stream_pb2.DaemonMessage(heartbeat=stream_pb2.Heartbeat(seq=1)))
        refusal = await call.ended()
        assert refusal.reason == "protocol_error"
        assert call.error is not None and call.error.code() == grpc.StatusCode.FAILED_PRECONDITION

        # a hello, then silence past the handshake deadline
        call = Call(channel)
        await call.call.write(_hello(node_id, token))
        assert (await call.ended()).reason == "handshake_timeout"
        assert call.kinds() == ["challenge"]

    _stream_scenario(relay, body)


def test_too_many_unattested_carries_its_reason(relay: RelayProcess) -> None:
    _key, node_id, token = _host(relay)

    async def attempt(channel: grpc.aio.Channel, hello: bool) -> Call | None:
        """Two streams mid-handshake (the cap), then a third, with a hello or silent; None
        if a holder timed out before the third opened (a slow machine), so the attempt
        proves nothing."""
        holders = [Call(channel), Call(channel)]
        for holder in holders:
            await holder.call.write(_hello(node_id, token))
            await holder.until("challenge")
        third = Call(channel)
        if hello:
            await third.send(_hello(node_id, token))
            # The relay reads the hello before it refuses, so the write never meets the
            # ended call (grpc's client would report its own INTERNAL, without details).
            assert third.error is None, third.error
        await third.until("challenge")
        for holder in holders:
            holder.call.cancel()
        if third.error is None:
            third.call.cancel()
            return None
        return third

    async def body(channel: grpc.aio.Channel) -> None:
        for hello in (True, False):  # silent: refused once the relay's short wait is over
            for _ in range(5):
                third = await attempt(channel, hello)
                if third is not None:
                    assert third.error is not None
                    assert third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert decoded(third.error).reason == "too_many_unattested"
                    assert third.got == []
                    break
            else:
                raise AssertionError("the third unattested stream was never refused")

    _stream_scenario(relay, body)


def test_replaced_and_revoked_streams_carry_their_reason(relay: RelayProcess) -> None:
    key, node_id, token = _host(relay)

    async def body(channel: grpc.aio.Channel) -> None:
        first, second = Call(channel), Call(channel)
        await first.call.write(_hello(node_id, token))
        await first.until("accepted", _attest(key, node_id))
        await second.call.write(_hello(node_id, token))
        await second.until("accepted", _attest(key, node_id))
        assert (await first.ended()).reason == "replaced"
        await asyncio.to_thread(relay.revoke, node_id)
        refusal = await second.ended()
        assert refusal.reason == "revoked"
        assert "revoked" in second.kinds()  # the in-band Revoked came first

    _stream_scenario(relay, body)


def test_the_daemon_stops_on_revoked_from_the_details(relay: RelayProcess, tmp_path: Path) -> None:
    host = enroll_host(relay, tmp_path / "host")
    relay.revoke(host.node_id)
    daemon = DaemonProcess.start(host.state_dir)
    try:
        assert daemon.wait_exit() == 3  # not retried: exit status 3, revoked
    finally:
        daemon.proc.kill()
    assert any(e.get("event") == "revoked" for e in daemon.events()), daemon.output.lines


def test_rate_limited_refusals_say_when_to_retry(tmp_path: Path) -> None:
    relay = RelayProcess.start(
        tmp_path / "relay",
        extra=["--enroll-limit-per-source", "1/1h", "--attest-limit-per-node", "1/1h"],
    )
    try:
        key, node_id, token = _host(relay)
        refusal = _refused_enrollment(relay, relay.enrollment_token("acme"))
        assert refusal.reason == "rate_limited"
        assert refusal.retry_after_secs > 0

        async def body(channel: grpc.aio.Channel) -> None:
            first = Call(channel)
            await first.call.write(_hello(node_id, token))
            await first.until("accepted", _attest(key, node_id))
            first.call.cancel()
            again = Call(channel)
            await again.call.write(_hello(node_id, token))
            refusal = await again.ended(_attest(key, node_id))
            assert refusal.reason == "rate_limited"
            assert refusal.retry_after_secs == again.got[-1].refused.retry_after_secs > 0

        _stream_scenario(relay, body)
    finally:
        relay.stop()
