"""Capability snapshot bounds: each bound names its field and limit; the sessions and the
host config apply them."""

from __future__ import annotations

import pytest

from aegis_edge_core.capability_limits import (
    DEFAULT_CAPABILITY_LIMITS as LIM,
)
from aegis_edge_core.capability_limits import (
    CapabilityError,
    CapabilityLimits,
    check_capabilities,
)
from aegis_edge_core.config import parse_config, parse_label
from aegis_edge_core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from aegis_edge_core.session import DaemonSession, RelaySession, RelayState
from aegis_edge_core.wire import common_pb2, stream_pb2


def caps(**kw: object) -> common_pb2.Capabilities:
    return common_pb2.Capabilities(os="linux", arch="x86_64", **kw)  # type: ignore[arg-type]


def test_a_full_but_legal_snapshot_passes() -> None:
    at_limit = caps(
        tools=[f"t{i:03d}" for i in range(LIM.max_tools)],
        labels={f"k{i}": "v" * 100 for i in range(LIM.max_labels)},
        hostname="h" * LIM.max_text,
    )
    check_capabilities(at_limit)
    check_capabilities(caps(labels={"k" * LIM.max_label_key: "v" * LIM.max_label_value}))


@pytest.mark.parametrize(
    ("snapshot", "field", "limit"),
    [
        (caps(tools=[f"t{i}" for i in range(257)]), "capabilities.tools", 256),
        (caps(tools=["x" * 129]), "capabilities.tools", 128),
        (caps(tools=[""]), "capabilities.tools", 128),
        (caps(labels={f"k{i}": "" for i in range(129)}), "capabilities.labels", 128),
        (caps(labels={"k" * 64: "v"}), "capabilities.labels.", 63),
        (caps(labels={"site": "x" * 257}), "capabilities.labels.site", 256),
        (caps(hostname="h" * 257), "capabilities.hostname", 256),
        (caps(agent_version="v" * 257), "capabilities.agent_version", 256),
    ],
)
def test_each_bound_names_field_and_limit(
    snapshot: common_pb2.Capabilities, field: str, limit: int
) -> None:
    with pytest.raises(CapabilityError) as err:
        check_capabilities(snapshot)
    assert err.value.field.startswith(field) and err.value.limit == limit
    assert str(err.value).startswith(err.value.field + ":")
    assert f"limit is {limit}" in str(err.value) or f"1 to {limit}" in str(err.value)


def test_total_size_bound_after_the_fields() -> None:
    limits = CapabilityLimits(max_bytes=1024)
    with pytest.raises(CapabilityError, match=r"^capabilities: the snapshot is \d+ bytes"):
        check_capabilities(caps(labels={f"k{i}": "v" * 200 for i in range(10)}), limits)
    with pytest.raises(ValueError, match="max_tools"):
        CapabilityLimits(max_tools=0)


def _hello(snapshot: common_pb2.Capabilities) -> stream_pb2.DaemonMessage:
    msg = stream_pb2.DaemonMessage()
    msg.hello.protocol_version = 1
    msg.hello.node_id = "n-1"
    msg.hello.node_token = "t"
    msg.hello.capabilities.CopyFrom(snapshot)
    return msg


def test_relay_session_closes_on_an_oversize_hello() -> None:
    relay = RelaySession()
    with pytest.raises(RemoteProtocolError) as err:
        relay.receive(_hello(caps(labels={"site": "x" * 2_000_000})), 0.0)
    assert err.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert "capabilities.labels.site" in str(err.value)
    assert relay.state is RelayState.CLOSED


def test_relay_session_closes_on_an_oversize_update() -> None:
    relay = RelaySession()
    relay.state = RelayState.ACCEPTED  # past the handshake (the rig covers getting there)
    update = stream_pb2.DaemonMessage()
    update.capabilities.capabilities.CopyFrom(caps(tools=[f"t{i}" for i in range(300)]))
    with pytest.raises(RemoteProtocolError, match=r"capabilities\.tools") as err:
        relay.receive(update, 0.0)
    assert err.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert relay.state is RelayState.CLOSED


def test_daemon_session_refuses_to_send_one() -> None:
    daemon = DaemonSession()
    with pytest.raises(LocalProtocolError, match=r"capabilities\.hostname"):
        daemon.hello(node_id="n-1", node_token="t", capabilities=caps(hostname="h" * 300), now=0)
    assert daemon.messages_to_send() == []


def test_host_config_refuses_oversize_labels_by_key() -> None:
    with pytest.raises(ConfigError, match=r"^labels\.site: the value is 300 characters"):
        parse_label("site=" + "x" * 300)
    many = "".join(f"  k{i}: v\n" for i in range(129))
    with pytest.raises(ConfigError, match=r"labels: 129 labels; the limit is 128"):
        parse_config(f"relay: r:1\nlabels:\n{many}", source="aegis-config.yaml")
