from __future__ import annotations

import pytest

from aegis_edge_core import hoststate as hs
from aegis_edge_core.wire import stream_pb2


def test_node_json_roundtrip_and_errors():
    info = hs.NodeInfo(
        node_id="n1",
        tenant_id="t",
        relay="h:1",
        key_thumbprint="x" * 43,
        enrolled_at=5.0,
        ca_sha256="ab",
    )
    assert hs.parse_node_json(info.to_json(), source="node.json") == info
    with pytest.raises(hs.HostStateError, match=r"^/d/node.json: not valid JSON"):
        hs.parse_node_json("{", source="/d/node.json")
    with pytest.raises(hs.HostStateError, match="'relay' is missing"):
        hs.parse_node_json(
            '{"node_id": "a", "tenant_id": "b", "key_thumbprint": "c"}', source="node.json"
        )


def test_status_json_roundtrip():
    st = hs.DaemonStatus(
        state=hs.ConnectionState.CONNECTED,
        pid=42,
        relay="r:1",
        updated_at=1.0,
        last_heartbeat_acked_at=2.0,
        last_error="",
    )
    assert hs.parse_status_json(st.to_json(), source="s") == st
    with pytest.raises(hs.HostStateError, match="unknown state"):
        hs.parse_status_json('{"state": "weird", "pid": 1}', source="s")


def test_result_spool_roundtrip_skips_damage():
    r1 = stream_pb2.CommandResult(command_id="a", exit_code=1, has_exit_code=True)
    r2 = stream_pb2.CommandResult(command_id="b", stdout_tail=b"\x00\xff")
    text = hs.encode_result_spool([r1, r2])
    damaged = text + '{"command_id": "c", "result_b64": "!!!"}\nnot json\n'
    results, problems = hs.decode_result_spool(damaged, source="spool")
    assert [r.command_id for r in results] == ["a", "b"]
    assert results[1].stdout_tail == b"\x00\xff"
    assert len(problems) == 2 and problems[0].startswith("spool:3:")


def test_child_pids_roundtrip():
    kids = [hs.ChildProcess(pgid=123, command_id="c", started_at=1.0, daemon_pid=9)]
    assert hs.decode_child_pids(hs.encode_child_pids(kids) + "junk\n", source="p") == kids


def test_mode_problem():
    assert hs.mode_problem("node.key", 0o600) is None
    assert "0644" in (hs.mode_problem("node.key", 0o644) or "")
    assert hs.mode_problem("ca.pem", 0o644) is None
    assert hs.mode_problem("edge", 0o755, is_dir=True)
    assert hs.mode_problem("edge", 0o700, is_dir=True) is None


def test_rotation_recovery():
    assert (
        hs.rotation_recovery(
            token_thumbprint="new", current_thumbprint="old", staged_thumbprint="new"
        )
        == "promote"
    )
    assert (
        hs.rotation_recovery(
            token_thumbprint="old", current_thumbprint="old", staged_thumbprint="new"
        )
        == "discard"
    )
    assert (
        hs.rotation_recovery(
            token_thumbprint=None, current_thumbprint=None, staged_thumbprint="new"
        )
        == "discard"
    )
