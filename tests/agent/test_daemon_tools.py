"""The daemon's command handling, without a relay: real subprocesses, policy, limits."""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest

from aegis_edge_agent.daemon import Daemon
from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.settings import AgentSettings
from aegis_edge_agent.statedir import StateDir
from aegis_edge_core.config import parse_config
from aegis_edge_core.wire import common_pb2, stream_pb2

ALLOW_CMD = "tools:\n  allow: [cmd.run, sys.info, edge.ping]\n  max_concurrent: 2\n"


def _daemon(tmp_path, config=ALLOW_CMD):
    d = Daemon(StateDir(tmp_path), log=EventLog(io.StringIO()))
    d.settings = AgentSettings(config=parse_config(config))
    return d


def _inv(cid, tool, args=None, timeout=0.0):
    return stream_pb2.CommandInvocation(
        command_id=cid, tool=tool, args_json=json.dumps(args or {}), timeout_secs=timeout
    )


async def _result(d, cid, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if cid in d.results:
            return d.results[cid]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no result for {cid}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_cmd_run_output_and_exit_code(tmp_path):
    async def go():
        d = _daemon(tmp_path)
        d._start_command(_inv("c1", "cmd.run", {"cmd": "echo out; echo err >&2; exit 3"}))
        r = await _result(d, "c1")
        assert r.outcome == common_pb2.TARGET_OUTCOME_ERROR
        assert r.error_kind == stream_pb2.ERROR_KIND_EXIT_NONZERO
        assert (r.exit_code, r.stdout_tail, r.stderr_tail) == (3, b"out\n", b"err\n")
        d._start_command(_inv("c2", "cmd.run", {"argv": ["printf", "%s", "a b"]}))
        r = await _result(d, "c2")
        assert r.outcome == common_pb2.TARGET_OUTCOME_OK and r.stdout_tail == b"a b"
        # the result is spooled until acknowledged
        assert {x.command_id for x in d.state.load_spool()[0]} == {"c1", "c2"}

    asyncio.run(go())


def test_output_cap(tmp_path):
    cfg = ALLOW_CMD + "  cmd_run:\n    output_cap_bytes: 1000\n"

    async def go():
        d = _daemon(tmp_path, cfg)
        d._start_command(_inv("c", "cmd.run", {"cmd": "head -c 5000 /dev/zero"}))
        r = await _result(d, "c")
        assert r.output_truncated and len(r.stdout_tail) == 1000

    asyncio.run(go())


def test_denied_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    async def go():
        d = _daemon(tmp_path, "tools:\n  allow: [sys.info]\n")
        d._start_command(_inv("c", "cmd.run", {"cmd": f"touch {marker}"}))
        r = await _result(d, "c")
        assert r.outcome == common_pb2.TARGET_OUTCOME_DENIED
        assert r.error_kind == stream_pb2.ERROR_KIND_DENIED
        assert "tools.allow" in r.error_message
        d2 = _daemon(tmp_path, "tools:\n  allow: [cmd.run]\n  cmd_run:\n    allow: ['echo *']\n")
        d2._start_command(_inv("d", "cmd.run", {"cmd": f"echo x; touch {marker}"}))
        r = await _result(d2, "d")
        assert r.error_kind == stream_pb2.ERROR_KIND_DENIED
        d2._start_command(_inv("e", "cmd.run", {"cmd": "echo fine"}))
        assert (await _result(d2, "e")).outcome == common_pb2.TARGET_OUTCOME_OK

    asyncio.run(go())
    assert not marker.exists()


def test_unknown_tool_bad_args_sys_info_ping(tmp_path):
    async def go():
        d = _daemon(tmp_path, "tools:\n  allow: ['*']\n")
        d._start_command(_inv("u", "nope.tool"))
        assert (await _result(d, "u")).error_kind == stream_pb2.ERROR_KIND_UNKNOWN_TOOL
        d._start_command(_inv("b", "sys.info", {"x": 1}))
        assert (await _result(d, "b")).error_kind == stream_pb2.ERROR_KIND_BAD_ARGUMENTS
        d._start_command(_inv("s", "sys.info"))
        info = json.loads((await _result(d, "s")).result_json)
        assert info["os"] == "linux" and info["hostname"] and info["python"]
        d._start_command(_inv("p", "edge.ping", {"echo": "hi"}))
        assert json.loads((await _result(d, "p")).result_json)["echo"] == "hi"

    asyncio.run(go())


def test_cancel_and_timeout_kill_the_process_group(tmp_path):
    pidfile = tmp_path / "pid"

    async def go():
        d = _daemon(tmp_path)
        # a grandchild that ignores SIGTERM: only the group SIGKILL gets it
        cmd = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; sleep 60' & wait"
        d._start_command(_inv("c", "cmd.run", {"cmd": cmd}))
        for _ in range(500):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.01)
        pid = int(pidfile.read_text())
        assert _alive(pid)
        assert d.state.load_children()[0].command_id == "c"
        running = d.running["c"]
        running.cancel_reason = "cancel"
        assert running.task is not None
        running.task.cancel()
        r = await _result(d, "c")
        assert r.outcome == common_pb2.TARGET_OUTCOME_CANCELLED
        assert not _alive(pid)
        assert d.state.load_children() == []

        d._start_command(_inv("t", "cmd.run", {"cmd": "sleep 30"}, timeout=0.3))
        r = await _result(d, "t")
        assert r.outcome == common_pb2.TARGET_OUTCOME_TIMEOUT
        assert r.finished_at - r.started_at < 5

    asyncio.run(go())


def test_cancel_while_the_process_is_being_made_ends_the_whole_group(tmp_path):
    # A cancel right after the invocation used to reach asyncio's own spawn clean-up, which
    # killed only the shell and then waited for pipes the shell's children still held.
    marker = tmp_path / "marker"

    async def go():
        d = _daemon(tmp_path)
        d._start_command(_inv("c", "cmd.run", {"cmd": f"(sleep 1; touch {marker}) & wait"}))
        running = d.running["c"]
        await asyncio.sleep(0)  # the tool has started making the process, not finished
        running.cancel_reason = "cancel"
        assert running.task is not None
        running.task.cancel()
        r = await _result(d, "c")
        assert r.outcome == common_pb2.TARGET_OUTCOME_CANCELLED
        assert d.state.load_children() == []
        await asyncio.sleep(1.5)

    asyncio.run(go())
    assert not marker.exists(), "a child of the cancelled call outlived it"


def test_concurrency_bound_answers_busy(tmp_path):
    async def go():
        d = _daemon(tmp_path)  # max_concurrent: 2
        for i in range(2):
            d._start_command(_inv(f"s{i}", "cmd.run", {"cmd": "sleep 30"}))
        d._start_command(_inv("x", "cmd.run", {"cmd": "true"}))
        r = await _result(d, "x")
        assert r.error_kind == stream_pb2.ERROR_KIND_BUSY
        await d._shutdown_tools()
        assert d.results["s0"].outcome == common_pb2.TARGET_OUTCOME_CANCELLED

    asyncio.run(go())


def test_orphans_from_a_crashed_daemon_are_killed(tmp_path):
    import subprocess
    import sys

    from aegis_edge_core import hoststate as hs

    env = dict(os.environ, AEGIS_EDGE_COMMAND_ID="old")
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True, env=env)
    try:
        sd = StateDir(tmp_path)
        sd.write_children(
            [hs.ChildProcess(pgid=proc.pid, command_id="old", started_at=0, daemon_pid=999999)]
        )
        d = Daemon(sd, log=EventLog(io.StringIO()))
        d._kill_orphans()
        assert proc.wait(timeout=5) == -9
        assert sd.load_children() == []
    finally:
        if proc.poll() is None:
            proc.kill()
    del sys


@pytest.mark.parametrize("bad", ["tools:\n  allow: 3\n", "nonsense_key: 1\n"])
def test_bad_config_is_named(tmp_path, bad):
    from aegis_edge_agent.settings import load_settings
    from aegis_edge_core.errors import ConfigError

    p = tmp_path / "aegis-config.yaml"
    p.write_text(bad)
    with pytest.raises(ConfigError, match=r"aegis-config\.yaml"):
        load_settings(p)
