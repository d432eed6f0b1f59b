"""The refusal table and the rich status the relay ends a refused RPC with."""

from __future__ import annotations

import pytest
from google.rpc import status_pb2

from aegis_edge_core import refusals
from aegis_edge_core.errors import LocalProtocolError
from aegis_edge_core.wire import common_pb2, stream_pb2


def test_every_reason_on_the_wire_has_a_status_code() -> None:
    names = {
        refusals.reason_name(v)
        for v in common_pb2.RefusalReason.values()
        if v != common_pb2.REFUSAL_REASON_UNSPECIFIED
    }
    assert names == set(refusals.REFUSAL_STATUS)


def test_rich_status_round_trips_through_its_bytes() -> None:
    status = refusals.rich_status(
        "rate_limited", "slow down; retry in 2s", relay_time=1700000000.5, retry_after_secs=2.0
    )
    assert status.code == 8  # RESOURCE_EXHAUSTED
    assert status.message == "slow down; retry in 2s"
    refused = stream_pb2.Refused()
    assert status.details[0].Unpack(refused)
    assert refused.reason == common_pb2.REFUSAL_REASON_RATE_LIMITED
    back = refusals.refusal_from_status(status.SerializeToString())
    assert back == refusals.Refusal(
        reason="rate_limited",
        message="slow down; retry in 2s",
        relay_time=1700000000.5,
        retry_after_secs=2.0,
    )
    assert refusals.refusal_from_status(status) == back


def test_a_protocol_violation_keeps_its_finer_code() -> None:
    status = refusals.rich_status(
        "protocol_error", "out of order", relay_time=1.0, code="FAILED_PRECONDITION"
    )
    assert status.code == 9


def test_what_is_not_a_refusal_reads_as_none() -> None:
    assert refusals.refusal_from_status(None) is None
    assert refusals.refusal_from_status(b"\xff\xff garbage") is None
    assert refusals.refusal_from_status(status_pb2.Status(code=13, message="boom")) is None


def test_a_newer_reason_reads_as_unspecified() -> None:
    assert refusals.reason_name(999) == "unspecified"


def test_an_unknown_reason_or_code_is_a_bug_named_here() -> None:
    with pytest.raises(LocalProtocolError, match="unknown refusal reason"):
        refusals.rich_status("sulking", "no", relay_time=1.0)
    with pytest.raises(LocalProtocolError, match="not one refusals use"):
        refusals.rich_status("revoked", "no", relay_time=1.0, code="OK")
