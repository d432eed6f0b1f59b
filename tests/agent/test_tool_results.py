"""The daemon's built-in tools answer what their result schemas promise (docs/tools.md)."""

from __future__ import annotations

import asyncio
import os

import pytest

from aegis_edge_agent.tools import BUILTIN, ToolContext
from aegis_edge_core import tools_spec as ts
from aegis_edge_core.identity import NodeKey
from aegis_edge_core.wire import stream_pb2
from tests.agent.test_daemon_tools import _daemon, _inv, _result


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("edge.ping", {}),
        ("edge.ping", {"echo": "hello"}),
        ("sys.info", {}),
        ("cmd.run", {"argv": ["/bin/echo", "hi"]}),
        ("cmd.run", {"cmd": "exit 4"}),
    ],
)
def test_builtin_results_satisfy_their_schema(tmp_path, tool, args) -> None:
    async def go() -> stream_pb2.CommandResult:
        d = _daemon(tmp_path)
        d._start_command(_inv("c-1", tool, args))
        return await _result(d, "c-1")

    result = asyncio.run(go())
    assert result.error_kind in (stream_pb2.ERROR_KIND_OK, stream_pb2.ERROR_KIND_EXIT_NONZERO)
    ts.validate_result(tool, result.result_json)


def test_keys_rotate_result_satisfies_its_schema() -> None:
    async def rotate() -> str:  # the live stream's part, played by a fresh key
        return NodeKey.from_seed(os.urandom(32)).thumbprint

    context = ToolContext(command_id="c-1", rotate_key=rotate)
    result = asyncio.run(BUILTIN[ts.KEYS_ROTATE].run({}, context))
    assert result.kind == stream_pb2.ERROR_KIND_OK
    ts.validate_result(ts.KEYS_ROTATE, result.result_json)
