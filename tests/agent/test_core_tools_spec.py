from __future__ import annotations

import json

import pytest

from aegis_edge_core import tools_spec as ts
from aegis_edge_core.wire import common_pb2, stream_pb2


def test_cmd_run_shell_and_argv():
    a = ts.validate_args("cmd.run", {"cmd": "echo hi", "timeout": "5s", "cwd": "/tmp"})
    assert isinstance(a, ts.CmdRunArgs)
    assert a.command_line == ("/bin/sh", "-c", "echo hi")
    assert a.timeout == 5.0 and a.cwd == "/tmp"
    b = ts.validate_args("cmd.run", {"argv": ["ls", "-l"], "timeout": 2})
    assert isinstance(b, ts.CmdRunArgs)
    assert b.command_line == ("ls", "-l") and b.display == "ls -l"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, ""),
        ({"cmd": "x", "argv": ["x"]}, ""),
        ({"cmd": ""}, "cmd"),
        ({"argv": []}, "argv"),
        ({"argv": ["ls", 3]}, "argv"),
        ({"cmd": "x", "timeout": -1}, "timeout"),
        ({"cmd": "x", "timeout": "soon"}, "timeout"),
        ({"cmd": "x", "env": {"A=B": "c"}}, "env"),
        ({"cmd": "x", "bogus": 1}, ""),
    ],
)
def test_cmd_run_bad_arguments(args, field):
    with pytest.raises(ts.ToolArgumentError) as info:
        ts.validate_args("cmd.run", args)
    assert info.value.field == field
    assert str(info.value).startswith("cmd.run")


def test_parse_args_json():
    assert ts.parse_args_json("sys.info", "") == {}
    with pytest.raises(ts.ToolArgumentError, match="JSON object"):
        ts.parse_args_json("sys.info", "[1]")
    with pytest.raises(ts.ToolArgumentError, match="not valid JSON"):
        ts.parse_args_json("sys.info", "{")
    with pytest.raises(ts.ToolArgumentError, match="unknown argument"):
        ts.validate_args("sys.info", {"x": 1})


def test_effective_timeout():
    assert ts.effective_timeout(None, 0, None) is None
    assert ts.effective_timeout(10, None, 3.5) == 3.5


def test_output_capture_caps_stream_and_keeps_tail():
    cap = ts.OutputCapture(cap=10, chunk=4)
    assert cap.feed("stdout", b"abcdef") == [b"abcd", b"ef"]
    assert cap.feed("stdout", b"ghijkl") == [b"ghij"]
    assert cap.truncated
    assert cap.feed("stdout", b"mn") == []
    assert cap.tail("stdout") == b"efghijklmn"
    assert cap.tail("stderr") == b""


def test_build_result_maps_outcome():
    cap = ts.OutputCapture()
    cap.feed("stderr", b"boom")
    r = ts.build_result(
        "c1",
        stream_pb2.ERROR_KIND_EXIT_NONZERO,
        started_at=1,
        finished_at=2,
        exit_code=3,
        capture=cap,
    )
    assert r.outcome == common_pb2.TARGET_OUTCOME_ERROR
    assert r.has_exit_code and r.exit_code == 3 and r.stderr_tail == b"boom"
    assert ts.outcome_for(stream_pb2.ERROR_KIND_DENIED) == common_pb2.TARGET_OUTCOME_DENIED
    assert ts.outcome_for(stream_pb2.ERROR_KIND_TIMEOUT) == common_pb2.TARGET_OUTCOME_TIMEOUT
    assert ts.outcome_for(stream_pb2.ERROR_KIND_BUSY) == common_pb2.TARGET_OUTCOME_ERROR


def test_capabilities_and_sys_info():
    caps = ts.capabilities(
        os="Linux",
        arch="AMD64",
        tools=["b", "a", "a"],
        labels={"k": "v"},
        hostname="h",
        agent_version="1",
    )
    assert (caps.os, caps.arch, list(caps.tools), dict(caps.labels)) == (
        "linux",
        "x86_64",
        ["a", "b"],
        {"k": "v"},
    )
    body = json.loads(
        ts.sys_info_json(
            os="Darwin",
            arch="arm64",
            hostname="h",
            python="3.11",
            uptime_secs=1.23456,
            load=[0.5, 0.25, 0.0],
            agent_version="1",
        )
    )
    assert body["os"] == "darwin" and body["arch"] == "aarch64" and body["uptime_secs"] == 1.235
