"""The scripts under examples/ run, on loopback, and say what their docstrings promise.

Each example runs as a subprocess with a timeout, exactly as a reader would run it; the
live half of ``drive_fleet_run.py`` runs against a real relay with scripted daemons.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis_edge_agent.tools import BUILTIN, Tool, ToolContext
from aegis_edge_core import tools_spec
from aegis_edge_core.config import DEFAULT_CONFIG, parse_config
from aegis_edge_core.wire import admin_pb2, common_pb2, stream_pb2
from tests.relay.daemon_driver import DaemonDriver, RelayProcess

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PLUGIN_DIR = EXAMPLES / "custom_tool_plugin"


def run_example(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_example_says_how_to_run_it() -> None:
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {"embed_minimal_relay.py", "drive_fleet_run.py"}
    for script in scripts:
        text = script.read_text()
        assert text.startswith('"""'), script
        assert f"examples/{script.name}" in text.split('"""')[1], f"{script}: no run line"


# --------------------------------------------------------------------------- embedding


def test_embed_minimal_relay() -> None:
    proc = run_example("examples/embed_minimal_relay.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    node_id = out.split("relay: enrolled ", 1)[1].split()[0]
    for line in (
        f"relay: {node_id} untracked -> Connected (attested)",
        f"daemon: accepted as {node_id}",
        "daemon: heartbeat 1 acked",
        f"relay: {node_id} Connected -> Unhealthy (stale)",
        "daemon: running edge.ping",
        f"relay: {node_id} Unhealthy -> Connected (heartbeat)",
        'ended ok with {"pong": true}',
        f"relay: {node_id} Connected -> Disconnected (stream_closed)",
        "relay: second enrollment refused: replayed",
        f"relay: final status of {node_id}: Disconnected",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "eyJ" not in out  # no token is ever printed


# --------------------------------------------------------------------------- fleet: offline


def test_plan_halts_like_the_seed_update() -> None:
    proc = run_example("examples/drive_fleet_run.py", "plan", "--json")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan: mode rolling=5 (window 5), on-error stop-after=1" in out
    for skip in ("web-04 (disconnected)", "web-09 (unhealthy)", "web-11 (tool_unavailable)"):
        assert f"skipped: {skip}" in out
    assert "laptop-01" not in out and "db-01" not in out  # not matched by the selector
    dispatched = [line.split()[-1] for line in out.splitlines() if " dispatch " in line]
    assert dispatched == ["web-01", "web-02", "web-03", "web-05", "web-06"]  # one window
    assert "result   web-05: error" in out
    assert "finish   halted" in out
    record = json.loads(out[out.index("{") :])
    assert record["outcome"] == "halted"
    assert record["deadline_secs"] == 120.0
    halted = [t["node_id"] for t in record["targets"] if t["skip_reason"] == "halted"]
    assert halted == ["web-07", "web-08", "web-10", "web-12"]


def test_plan_deadline_cancels_in_flight() -> None:
    proc = run_example(
        "examples/drive_fleet_run.py",
        "plan",
        "--deadline",
        "20s",
        "--fail",
        "",
        "--mode",
        "rolling=3",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "t= 20.0s cancel" in out and "(deadline)" in out
    assert "finish   deadline_exceeded" in out
    assert "record: outcome deadline_exceeded; deadline of 20s reached" in out
    # Never more than three in flight: count dispatches minus results over time.
    in_flight = peak = 0
    for line in out.splitlines():
        if " dispatch " in line:
            in_flight += 1
        elif " result " in line:
            in_flight -= 1
        peak = max(peak, in_flight)
    assert peak == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--target", "tags=AnyOf(a"), "unclosed '('"),
        (("--mode", "rolin=3"), "did you mean 'rolling'"),
        (("--on-error", "stop-after=0"), "on-error count must be within 1.."),
    ],
)
def test_plan_refuses_bad_flags(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the script's main() takes argv): parse errors need no subprocess.
    spec = importlib.util.spec_from_file_location(
        "drive_fleet_run", EXAMPLES / "drive_fleet_run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["plan", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- fleet: live


@pytest.mark.integration
def test_drive_fleet_run_against_a_relay(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay")
    try:
        proc = asyncio.run(_live_run(relay))
    finally:
        assert relay.stop() == 0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "preview: 3 matched" in out
    assert out.count("  dispatched ") == 3
    assert out.count(": ok exit 0") == 3
    assert ": completed" in out.splitlines()[-4]  # the final record, then one line per target


async def _live_run(relay: RelayProcess) -> subprocess.CompletedProcess[str]:
    async with relay.channel() as channel:
        admin = relay.admin(channel)
        daemons = []
        for _ in range(3):
            issued = await admin.IssueEnrollmentToken(
                admin_pb2.IssueEnrollmentTokenRequest(tenant_id="acme"), metadata=relay.auth()
            )
            daemon = DaemonDriver(channel, tools=["edge.ping"])
            await daemon.enroll(issued.token)
            await daemon.connect()
            daemon.start_heartbeats(0.5)
            daemons.append(daemon)
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "examples/drive_fleet_run.py",
                "run",
                "--relay-data-dir",
                str(relay.data_dir),
                "--target",
                "all",
                "--tool",
                "edge.ping",
                "--mode",
                "rolling=2",
                "--deadline",
                "30s",
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=30)
        finally:
            for daemon in daemons:
                await daemon.close()
    assert child.returncode is not None
    return subprocess.CompletedProcess(
        ["drive_fleet_run.py", "run"], child.returncode, stdout.decode(), stderr.decode()
    )


# --------------------------------------------------------------------------- tool plugin


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    module = importlib.import_module("aegis_example_disk_tool")
    yield module
    sys.modules.pop("aegis_example_disk_tool", None)


def _run_tool(tool: Tool, args: dict[str, Any]) -> tuple[stream_pb2.CommandResult, list[bytes]]:
    """What the daemon does per call: a ToolContext in, a ToolResult out, shaped by the core."""
    chunks: list[bytes] = []
    context = ToolContext(command_id="cmd-1", emit=lambda stream, data: chunks.append(data))
    result = asyncio.run(tool.run(args, context))
    shaped = tools_spec.build_result(
        "cmd-1",
        result.kind,
        started_at=1.0,
        finished_at=2.0,
        message=result.message,
        exit_code=result.exit_code,
        capture=context.capture,
        result_json=result.result_json,
    )
    return shaped, chunks


def test_plugin_satisfies_the_tool_protocol(plugin: Any) -> None:
    tool = plugin.DiskUsage()
    assert isinstance(tool, Tool)
    assert tool.name == "example.disk_usage"
    assert tool.name not in BUILTIN


def test_plugin_runs_like_the_daemon_runs_it(plugin: Any, tmp_path: Path) -> None:
    result, chunks = _run_tool(plugin.DiskUsage(), {"path": str(tmp_path)})
    assert result.outcome == common_pb2.TARGET_OUTCOME_OK
    assert result.exit_code == 0 and result.has_exit_code
    body = json.loads(result.result_json)
    assert body["path"] == str(tmp_path)
    assert body["total"] >= body["used"] > 0
    assert b"% used of" in b"".join(chunks)
    assert result.stdout_tail == b"".join(chunks)

    # Fuller than warn_percent=0: the tool fails with exit 1, the target ends `error`.
    result, _ = _run_tool(plugin.DiskUsage(), {"path": str(tmp_path), "warn_percent": 0})
    assert result.outcome == common_pb2.TARGET_OUTCOME_ERROR
    assert result.exit_code == 1
    assert "full (warn_percent 0)" in result.error_message

    result, _ = _run_tool(plugin.DiskUsage(), {"path": str(tmp_path / "missing")})
    assert result.outcome == common_pb2.TARGET_OUTCOME_ERROR
    assert "cannot stat" in result.error_message


@pytest.mark.parametrize(
    "args", [{"path": ""}, {"warn_percent": 101}, {"warn_percent": True}, {"colour": "red"}]
)
def test_plugin_validates_its_arguments(plugin: Any, args: dict[str, Any]) -> None:
    with pytest.raises(tools_spec.ToolArgumentError, match=r"^example\.disk_usage"):
        asyncio.run(plugin.DiskUsage().run(args, ToolContext(command_id="cmd-1")))


def test_plugin_is_denied_until_the_host_allows_it() -> None:
    assert not DEFAULT_CONFIG.policy().evaluate("example.disk_usage").allowed
    local = parse_config("tools:\n  allow: [sys.info, edge.ping, 'example.*']\n")
    assert local.policy().evaluate("example.disk_usage", {"path": "/"}).allowed


def test_plugin_entry_point_is_found_by_the_daemon(tmp_path: Path) -> None:
    """``load_plugins()`` finds it through ``aegis_edge.tools`` -- nothing installed: a
    dist-info directory on PYTHONPATH is all ``importlib.metadata`` needs."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    dist = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    group = project["entry-points"]["aegis_edge.tools"]
    lines = [f"{name} = {target}" for name, target in group.items()]
    (dist / "entry_points.txt").write_text("[aegis_edge.tools]\n" + "\n".join(lines) + "\n")
    code = (
        "from aegis_edge_agent.tools import load_plugins\n"
        "errors = []\n"
        "tools = load_plugins(lambda name, err: errors.append((name, err)))\n"
        "print(sorted(tools), errors)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PLUGIN_DIR)]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "'example.disk_usage'" in proc.stdout
    assert proc.stdout.strip().endswith("[]")  # no plugin failed to load


def test_plugin_script_runs_standalone() -> None:
    proc = run_example("examples/custom_tool_plugin/aegis_example_disk_tool.py", str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["path"] == str(REPO)


# --------------------------------------------------------------------------- spec-only daemon

MINIMAL = EXAMPLES / "minimal_daemon" / "daemon.py"
# Runs the example with every aegis_edge* import refused, so the proof that it needs none of
# this repository's packages is made by running it, not only by reading it.
NO_AEGIS = (
    "import importlib.abc, runpy, sys\n"
    "class NoAegis(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.startswith('aegis_edge'):\n"
    "            raise ImportError(f'the spec-only daemon imported {name}')\n"
    "sys.meta_path.insert(0, NoAegis())\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _minimal(*argv: str) -> list[str]:
    return [sys.executable, "-c", NO_AEGIS, str(MINIMAL), *argv]


def test_the_minimal_daemon_imports_nothing_of_ours() -> None:
    import ast

    allowed = {"grpc", "jwt", "cryptography"}
    for script in (EXAMPLES / "minimal_daemon").rglob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert not top.startswith("aegis"), f"{script}: imports {name}"
                assert top in allowed or top in sys.stdlib_module_names, f"{script}: {name}"


def test_the_minimal_daemon_spells_arch_as_the_agent_does() -> None:
    # docs/protocol.md §9.2's table, which the agent follows (tools_spec.ARCH_ALIASES)
    import ast

    names: dict[str, str] = {}
    for node in ast.walk(ast.parse(MINIMAL.read_text())):
        if isinstance(node, ast.Assign | ast.AugAssign) and isinstance(node.value, ast.Dict):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "ARCH_NAMES":
                names |= ast.literal_eval(node.value)
    assert names == dict(tools_spec.ARCH_ALIASES)


def test_the_minimal_daemon_enrolls_heartbeats_and_answers_a_fleet_run(tmp_path: Path) -> None:
    import threading

    from tests.agent.harness import RelayProcess as LiveRelay

    relay = LiveRelay.start(tmp_path / "relay", heartbeat_interval="0.5s", stale_threshold="3s")
    daemon: subprocess.Popen[str] | None = None
    try:
        state = tmp_path / "mini"
        enrolled = subprocess.run(
            _minimal("enroll", relay.enrollment_token("acme"), "--state-dir", str(state)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        node_id = json.loads(enrolled.stdout.splitlines()[-1])["node_id"]
        assert {p.name for p in state.iterdir()} >= {"node.key", "node.token", "ca.pem"}

        daemon = subprocess.Popen(
            _minimal("run", "--state-dir", str(state)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        events: list[dict[str, Any]] = []
        acked = threading.Event()

        def read() -> None:
            assert daemon is not None and daemon.stdout is not None
            for line in daemon.stdout:
                events.append(json.loads(line))
                if events[-1]["event"] == "heartbeat_ack" and events[-1]["seq"] >= 2:
                    acked.set()

        threading.Thread(target=read, daemon=True).start()
        assert acked.wait(60), (events, daemon.poll())
        assert relay.host(node_id).status == common_pb2.DAEMON_STATUS_CONNECTED

        run = relay.run(node_id, "edge.ping", {"echo": "from the spec"})
        assert run.outcome == common_pb2.RUN_OUTCOME_COMPLETED, run
        (target,) = run.targets
        assert target.outcome == common_pb2.TARGET_OUTCOME_OK
        tools_spec.validate_result("edge.ping", target.result_json)
        assert json.loads(target.result_json)["echo"] == "from the spec"
        # §9.4: the result was spooled until the relay acknowledged it, then dropped
        for _ in range(300):
            if any(e["event"] == "result_acked" for e in events):
                break
            time.sleep(0.1)
        assert [e for e in events if e["event"] == "result_acked"], events
        assert not list(state.glob("result-*"))

        # it stops for good once revoked (the in-band Revoked) ...
        relay.revoke(node_id)
        assert daemon.wait(timeout=30) == 3
        assert events[-1]["event"] == "revoked", events
        # ... and started again it is refused, and stops on the reason in the status details
        again = subprocess.run(
            _minimal("run", "--state-dir", str(state)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode == 3, again.stderr
        lines = [json.loads(line) for line in again.stdout.splitlines()]
        assert [e["event"] for e in lines] == ["refused", "revoked"], lines
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        relay.stop()
