"""The relay holds fleet runs to the built-in tools' argument schemas: bad arguments end
PreviewFleetRun and StartFleetRun with INVALID_ARGUMENT naming the argument, before
anything is dispatched; a plug-in tool's arguments pass through."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from aegis_edge_core.wire import admin_pb2
from tests.agent.harness import RelayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield proc
    proc.stop()


def _spec(tool: str, args: dict[str, object]) -> admin_pb2.FleetRunSpec:
    return admin_pb2.FleetRunSpec(selector="all", tool=tool, args_json=json.dumps(args))


@pytest.mark.parametrize(
    ("tool", "args", "named"),
    [
        ("cmd.run", {"cmd": "uptime", "timeout": "soon"}, "cmd.run.timeout"),
        ("cmd.run", {"cmd": "uptime", "timeout": "1e3"}, "cmd.run.timeout"),
        ("cmd.run", {"argv": ["ls", 3]}, "cmd.run.argv"),
        ("edge.ping", {"echo": 7}, "edge.ping.echo"),
        ("sys.info", {"verbose": True}, "unknown argument(s) verbose"),
    ],
)
def test_bad_arguments_are_refused_before_dispatch(
    relay: RelayProcess, tool: str, args: dict[str, object], named: str
) -> None:
    stub, md = relay.admin()
    with pytest.raises(grpc.RpcError) as preview:
        stub.PreviewFleetRun(_spec(tool, args), metadata=md, timeout=10)
    assert preview.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert named in preview.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as start:
        list(stub.StartFleetRun(_spec(tool, args), metadata=md, timeout=10))
    assert start.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert named in start.value.details()  # type: ignore[attr-defined]
    runs = stub.ListFleetRuns(admin_pb2.ListFleetRunsRequest(), metadata=md, timeout=10)
    assert not [r for r in runs.runs if r.spec.tool == tool]  # nothing was recorded


def test_a_preview_without_arguments_asks_only_for_targets(relay: RelayProcess) -> None:
    stub, md = relay.admin()
    assert stub.PreviewFleetRun(_spec("cmd.run", {}), metadata=md, timeout=10).matched == 0
    with pytest.raises(grpc.RpcError) as start:
        list(stub.StartFleetRun(_spec("cmd.run", {}), metadata=md, timeout=10))
    assert start.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "exactly one of 'cmd'" in start.value.details()  # type: ignore[attr-defined]


def test_plugin_tool_arguments_pass_through(relay: RelayProcess) -> None:
    stub, md = relay.admin()
    preview = stub.PreviewFleetRun(
        _spec("acme.deploy", {"anything": [1, {"goes": True}]}), metadata=md, timeout=10
    )
    assert preview.matched == 0
