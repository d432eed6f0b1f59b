"""Bad input on the daemon stream: random and mutated frames, oversized frames, messages out
of order and floods of hellos, while an honest daemon keeps heartbeating on the same relay.

Each bad stream must end with a status code (counted in
``aegis_edge_stream_protocol_errors_total``) or a ``Refused``; none may ever be
``Accepted``; the relay must never answer INTERNAL/UNKNOWN (a crash in the handler); and
the good daemon must hear every heartbeat acked throughout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis_edge_core.wire import common_pb2, stream_pb2
from tests.faults.conftest import Tally
from tests.faults.helpers import (
    CONNECTED,
    STREAM_METHOD,
    GoodDaemon,
    metric_sum,
    sync_channel,
)
from tests.relay.daemon_driver import RelayProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
PROTOCOL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(
        tmp_path_factory.mktemp("relay"), "--heartbeat-interval", "0.5s", "--stale-threshold", "2s"
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def good(relay: RelayProcess) -> Iterator[GoodDaemon]:
    with GoodDaemon(relay, "good") as daemon:
        yield daemon
        daemon.check()


def _msg(**body: Any) -> bytes:
    msg = stream_pb2.DaemonMessage(**body)
    return msg.SerializeToString()


VALID_FRAMES = [
    _msg(
        hello=stream_pb2.Hello(
            protocol_version=1,
            node_id="n-0123456789abcdef",
            node_token="eyJhbGciOiJFZERTQSJ9.e30.AAAA",
            capabilities=common_pb2.Capabilities(os="linux", tools=["cmd.run"]),
            host_time=time.time(),
        )
    ),
    _msg(hello=stream_pb2.Hello(protocol_version=7, node_id="n-x", node_token="t")),
    _msg(hello=stream_pb2.Hello(protocol_version=1)),
    _msg(attestation=stream_pb2.AttestationResponse(signature=os.urandom(64))),
    _msg(heartbeat=stream_pb2.Heartbeat(seq=1, host_time=time.time())),
    _msg(capabilities=stream_pb2.CapabilityUpdate()),
    _msg(output=stream_pb2.CommandOutput(command_id="c-1", stdout=b"x")),
    _msg(result=stream_pb2.CommandResult(command_id="c-1", outcome=1)),
    _msg(rotate_key=stream_pb2.RotateKey(new_public_key=os.urandom(32))),
    _msg(token_refresh=stream_pb2.TokenRefreshRequest()),
    b"",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += data[: draw(st.integers(0, len(data)))]
    return bytes(data)


frames = st.one_of(st.binary(max_size=256), st.sampled_from(VALID_FRAMES), mutated())


def send_stream(channel: grpc.Channel, stream: list[bytes]) -> tuple[str, list[Any]]:
    """Send frames on one stream; returns (how it ended, relay messages)."""
    call = channel.stream_stream(
        STREAM_METHOD,
        request_serializer=lambda b: b,
        response_deserializer=stream_pb2.RelayMessage.FromString,
    )
    got: list[Any] = []
    try:
        for msg in call(iter(stream), timeout=10):
            got.append(msg)
    except grpc.RpcError as err:
        return err.code().name, got  # type: ignore[attr-defined]
    return "OK", got


class Outcomes:
    def __init__(self) -> None:
        self.by_end: dict[str, int] = {}
        self.accepted = 0
        self.refused = 0

    def add(self, end: str, got: list[Any]) -> None:
        self.by_end[end] = self.by_end.get(end, 0) + 1
        kinds = [m.WhichOneof("body") for m in got]
        self.accepted += "accepted" in kinds
        self.refused += "refused" in kinds

    def protocol_closes(self) -> int:
        return sum(self.by_end.get(c.name, 0) for c in PROTOCOL_CODES)


def test_fuzzed_frames(relay: RelayProcess, good: GoodDaemon, tally: Tally) -> None:
    before = metric_sum(relay.scrape(), "aegis_edge_stream_protocol_errors_total")
    channel = sync_channel(relay)
    seen = Outcomes()

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True,
    )
    @given(stream=st.lists(frames, min_size=1, max_size=5))
    def fuzz(stream: list[bytes]) -> None:
        end, got = send_stream(channel, stream)
        seen.add(end, got)
        kinds = [m.WhichOneof("body") for m in got]
        tally.refused("accepted" not in kinds, f"fuzzed stream {stream!r:.200}")
        assert end not in ("INTERNAL", "UNKNOWN"), (end, stream)

    try:
        fuzz()
    finally:
        channel.close()
    assert seen.accepted == 0
    assert seen.protocol_closes() > 100, seen.by_end
    after = metric_sum(relay.scrape(), "aegis_edge_stream_protocol_errors_total")
    assert after - before == seen.protocol_closes(), (after - before, seen.by_end)


def test_out_of_order_and_oversized(relay: RelayProcess, good: GoodDaemon, tally: Tally) -> None:
    hello, _, _, attest, heartbeat, caps, output, result, rotate, refresh, empty = VALID_FRAMES
    cases: list[tuple[list[bytes], set[str]]] = [
        ([heartbeat], {"FAILED_PRECONDITION"}),
        ([attest], {"FAILED_PRECONDITION"}),
        ([result], {"FAILED_PRECONDITION"}),
        ([output], {"FAILED_PRECONDITION"}),
        ([rotate], {"FAILED_PRECONDITION"}),
        ([refresh], {"FAILED_PRECONDITION"}),
        ([caps], {"FAILED_PRECONDITION"}),
        ([hello, hello], {"FAILED_PRECONDITION"}),
        ([hello, heartbeat], {"FAILED_PRECONDITION"}),
        ([hello, result], {"FAILED_PRECONDITION"}),
        ([empty], {"INVALID_ARGUMENT"}),
        ([VALID_FRAMES[1]], {"INVALID_ARGUMENT"}),  # unsupported protocol version
        ([VALID_FRAMES[2]], {"INVALID_ARGUMENT"}),  # hello without node id or token
        ([b"\x0a" + b"\xff" * 10], {"INVALID_ARGUMENT"}),
        ([b"\x0a\x80\x80\x80\x02" + b"x" * (5 * 1024 * 1024)], {"RESOURCE_EXHAUSTED"}),
        # past gRPC's own cap: refused before the handler, still with a status code
        ([b"\x0a" + b"x" * (9 * 1024 * 1024)], {"RESOURCE_EXHAUSTED"}),
    ]
    channel = sync_channel(relay)
    try:
        for stream, expected in cases:
            end, got = send_stream(channel, stream)
            kinds = [m.WhichOneof("body") for m in got]
            tally.refused(end in expected and "accepted" not in kinds, f"{stream!r:.80}")
            assert end in expected, (stream[:1], end)
    finally:
        channel.close()


def test_hello_floods(relay: RelayProcess, good: GoodDaemon, tally: Tally) -> None:
    """500 concurrent streams naming a made-up node, 200 naming the good daemon's node (from
    this address) and 100 streams that never finish the handshake: each ends refused or
    rate-limited; the good daemon never notices; limits kick in per node."""
    text = relay.scrape()
    before_rl = metric_sum(text, "aegis_edge_attestation_refusals_total", reason="rate_limited")

    async def one(channel: grpc.aio.Channel, node_id: str, attest: bool) -> tuple[str, list[Any]]:
        call = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=stream_pb2.RelayMessage.FromString,
        )(timeout=20)
        got: list[Any] = []
        hello = stream_pb2.DaemonMessage(
            hello=stream_pb2.Hello(protocol_version=1, node_id=node_id, node_token="forged.jwt.x")
        )
        try:
            await call.write(hello.SerializeToString())
            first = await call.read()
            if first is not EOF:
                got.append(first)
            if attest and first is not EOF and first.WhichOneof("body") == "challenge":
                await call.write(
                    stream_pb2.DaemonMessage(
                        attestation=stream_pb2.AttestationResponse(signature=os.urandom(64))
                    ).SerializeToString()
                )
                got.append(await call.read())
            await call.done_writing()
            while (msg := await call.read()) is not EOF:
                got.append(msg)
        except grpc.aio.AioRpcError as err:
            return err.code().name, got
        return (await call.code()).name, [m for m in got if m is not EOF]

    async def scenario() -> list[tuple[str, list[Any]]]:
        async with relay.channel() as channel:
            jobs = [one(channel, "n-made-up", True) for _ in range(500)]
            jobs += [one(channel, good.node_id, True) for _ in range(200)]
            jobs += [one(channel, f"n-silent-{i}", False) for i in range(100)]
            return list(await asyncio.gather(*jobs))

    results = asyncio.run(scenario())
    reasons: dict[str, int] = {}
    for end, got in results:
        kinds = [m.WhichOneof("body") for m in got]
        ok = "accepted" not in kinds
        tally.refused(ok, "flooded hello")
        for m in got:
            if m.WhichOneof("body") == "refused":
                name = common_pb2.RefusalReason.Name(m.refused.reason)
                reasons[name] = reasons.get(name, 0) + 1
                if m.refused.reason == common_pb2.REFUSAL_REASON_RATE_LIMITED:
                    assert m.refused.retry_after_secs > 0
        assert end not in ("INTERNAL", "UNKNOWN"), end
    # per (node, source): 30 attempts, then rate_limited, for each flooded node id
    assert reasons.get("REFUSAL_REASON_RATE_LIMITED", 0) >= 600, reasons
    assert reasons.get("REFUSAL_REASON_UNKNOWN_NODE", 0) <= 31, reasons
    after_rl = metric_sum(
        relay.scrape(), "aegis_edge_attestation_refusals_total", reason="rate_limited"
    )
    assert after_rl - before_rl == reasons["REFUSAL_REASON_RATE_LIMITED"]

    async def still_connected() -> int:
        async with relay.channel() as channel:
            return await good.status(channel)

    assert asyncio.run(still_connected()) == CONNECTED
