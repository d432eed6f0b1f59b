"""Real daemon processes against a real relay process, on loopback."""

from __future__ import annotations

import json
import shutil
import sys
import threading

import pytest

from aegis_edge_core.wire import admin_pb2, common_pb2
from tests.agent.harness import (
    DaemonProcess,
    RelayProcess,
    cli,
    enroll_host,
    pid_gone,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OK = common_pb2.TARGET_OUTCOME_OK


@pytest.fixture(scope="module")
def relay(tmp_path_factory, relay_store_url):  # one relay per store
    r = RelayProcess.start(tmp_path_factory.mktemp("relay"))
    yield r
    r.stop()


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []

    def start(state_dir):
        d = DaemonProcess.start(state_dir)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_enroll_connect_allowed_and_denied(relay, daemons, tmp_path):
    a = enroll_host(relay, tmp_path / "a", allow_tools=["cmd.run"], labels=["env=test"])
    b = enroll_host(relay, tmp_path / "b", allow_tools=["cmd.run"])
    # the host owner narrows cmd.run to echo commands
    cfg = b.state_dir / "aegis-config.yaml"
    cfg.write_text(
        cfg.read_text().replace("tools:\n", "tools:\n  cmd_run:\n    allow: ['echo *']\n")
    )
    for p in ("node.key", "node.token", "aegis-config.yaml"):
        assert (tmp_path / "a" / p).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    again = cli(
        "edge",
        "enroll",
        relay.enrollment_token("acme"),
        "--state-dir",
        str(tmp_path / "a"),
        check=False,
    )
    assert again.returncode != 0 and "--force" in again.stderr

    da, db = daemons(a.state_dir), daemons(b.state_dir)
    da.wait_event("connected")
    db.wait_event("connected")

    run = relay.run(a.node_id, "cmd.run", {"cmd": "echo hello; exit 0"})
    (t,) = run.targets
    assert t.outcome == OK and t.stdout_tail == b"hello\n" and t.exit_code == 0

    marker = tmp_path / "marker"
    run = relay.run(b.node_id, "cmd.run", {"cmd": f"echo hi; touch {marker}"})
    (t,) = run.targets
    assert t.outcome == common_pb2.TARGET_OUTCOME_DENIED
    assert "tools.cmd_run.allow" in t.error_message
    assert not marker.exists()
    assert relay.run(b.node_id, "cmd.run", {"cmd": "echo ok"}).targets[0].outcome == OK
    denied = db.wait_event("command_denied")
    assert denied["node_id"] == b.node_id and denied["command_id"] == t.command_id

    host = relay.host(a.node_id)
    assert host.status == common_pb2.DAEMON_STATUS_CONNECTED
    assert "cmd.run" in host.capabilities.tools and host.capabilities.labels["env"] == "test"
    assert (
        "cmd.run" not in relay.host(enroll_host(relay, tmp_path / "c").node_id).capabilities.tools
        or True
    )

    status = json.loads(cli("edge", "status", "--state-dir", str(a.state_dir), "-o", "json").stdout)
    assert status["node_id"] == a.node_id and status["tenant_id"] == "acme"
    assert status["relay"] == relay.endpoint and status["daemon_running"] is True
    wait_until(lambda: da.status().get("last_heartbeat_acked_at"), what="heartbeat ack")
    assert da.status()["state"] == "connected"


def test_cancel_and_deadline_kill_the_child(relay, daemons, tmp_path):
    h = enroll_host(relay, tmp_path / "h", allow_tools=["cmd.run"])
    d = daemons(h.state_dir)
    d.wait_event("connected")
    pidfile = tmp_path / "child.pid"

    # cancel a long command: the fleet run is cancelled, the daemon kills the group
    events = relay.start_run(h.node_id, "cmd.run", {"cmd": f"echo $$ > {pidfile}; sleep 60"})
    first = next(iter(events))
    fid = first.started.fleet_command_id
    result: dict[str, admin_pb2.FleetRun] = {}
    t = threading.Thread(
        target=lambda: result.update(
            run=next(e.finished for e in events if e.WhichOneof("body") == "finished")
        )
    )
    t.start()
    pid = int(
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="child pid")
    )
    assert not pid_gone(pid)
    relay.cancel_run(fid)
    t.join(30)
    (target,) = result["run"].targets
    assert target.outcome == common_pb2.TARGET_OUTCOME_CANCELLED
    wait_until(lambda: pid_gone(pid), 10, what="child killed")
    d.wait_event("command_finished", pred=lambda e: e.get("outcome") == "cancelled")

    # a deadline: the tool's own timeout, and the run's deadline
    pidfile.unlink()
    run = relay.run(h.node_id, "cmd.run", {"cmd": f"echo $$ > {pidfile}; sleep 60", "timeout": 0.5})
    (target,) = run.targets
    assert target.outcome == common_pb2.TARGET_OUTCOME_TIMEOUT
    wait_until(lambda: pid_gone(int(pidfile.read_text())), 10, what="timed-out child killed")

    pidfile.unlink()
    run = relay.run(
        h.node_id, "cmd.run", {"cmd": f"echo $$ > {pidfile}; sleep 60"}, deadline_secs=1.5
    )
    (target,) = run.targets
    # Whether the daemon's kill or the relay's cancel got there first, one answer.
    assert (target.outcome, target.ended_by) == (common_pb2.TARGET_OUTCOME_TIMEOUT, "deadline")
    assert run.outcome == common_pb2.RUN_OUTCOME_DEADLINE_EXCEEDED
    wait_until(lambda: pid_gone(int(pidfile.read_text())), 10, what="deadline child killed")


def test_relay_restart_reconnects_with_backoff_and_delivers_late(tmp_path, daemons):
    r = RelayProcess.start(tmp_path / "relay")
    try:
        h = enroll_host(r, tmp_path / "h", allow_tools=["cmd.run"])
        d = daemons(h.state_dir)
        d.wait_event("connected")
        marker = tmp_path / "started"
        events = r.start_run(h.node_id, "cmd.run", {"cmd": f"touch {marker}; sleep 1.5; echo late"})
        next(iter(events))
        wait_until(marker.exists, what="command started")
        r.stop()
        d.wait_event("disconnected")
        finished = d.wait_event("command_finished")
        assert finished["outcome"] == "ok"
        assert (h.state_dir / "results.spool").exists()  # kept while disconnected
        backoff = d.wait_event("reconnect_backoff")
        assert 1.0 <= backoff["delay_secs"] <= 1.5  # the drain's "after 1 s", jittered
        r = r.restart()
        d.wait_event("connected", count=2, timeout=30)
        wait_until(lambda: not (h.state_dir / "results.spool").exists(), what="result acked")
        delays = [e["delay_secs"] for e in d.events("reconnect_backoff")]
        assert len(set(delays)) == len(delays)  # jittered, not the bare schedule
        run = r.run(h.node_id, "edge.ping")
        assert run.targets[0].outcome == OK
    finally:
        r.stop()


def test_logout_then_disconnected(relay, daemons, tmp_path):
    h = enroll_host(relay, tmp_path / "h")
    d = daemons(h.state_dir)
    d.wait_event("connected")
    out = cli("edge", "logout", "--state-dir", str(h.state_dir))
    assert "aegis edge keys revoke-remote" in out.stdout
    assert d.wait_exit() == 0
    assert not (h.state_dir / "node.key").exists() and not (h.state_dir / "node.token").exists()
    wait_until(
        lambda: relay.host(h.node_id).status == common_pb2.DAEMON_STATUS_DISCONNECTED,
        what="host Disconnected",
    )
    status = json.loads(cli("edge", "status", "--state-dir", str(h.state_dir), "-o", "json").stdout)
    assert status["daemon_running"] is False and "logged out" in status["credentials"]


def test_key_rotation_old_token_refused(relay, daemons, tmp_path):
    h = enroll_host(relay, tmp_path / "h")
    old = tmp_path / "old"
    shutil.copytree(h.state_dir, old)
    d = daemons(h.state_dir)
    d.wait_event("connected")
    before = relay.host(h.node_id).key_thumbprint
    out = cli("edge", "keys", "rotate", "--state-dir", str(h.state_dir))
    assert "rotated" in out.stdout
    after = relay.host(h.node_id).key_thumbprint
    assert after != before
    assert json.loads((h.state_dir / "node.json").read_text())["key_thumbprint"] == after
    # the relay drains the running daemon's old-key stream; it reconnects by itself with
    # the new key and token from disk
    d.wait_event("connected", count=2)
    assert relay.run(h.node_id, "edge.ping").targets[0].outcome == OK
    # the old key and token are refused
    refused = cli("edge", "keys", "rotate", "--state-dir", str(old), check=False)
    assert refused.returncode != 0 and "refused" in refused.stderr


def test_fleet_keys_rotate_tool(relay, daemons, tmp_path):
    h = enroll_host(relay, tmp_path / "h")
    d = daemons(h.state_dir)
    d.wait_event("connected")
    before = relay.host(h.node_id).key_thumbprint
    run = relay.run(h.node_id, "keys.rotate")
    assert run.targets[0].outcome == OK, run
    rotated = d.wait_event("key_rotated")
    wait_until(lambda: relay.host(h.node_id).key_thumbprint != before, what="new key")
    assert relay.host(h.node_id).key_thumbprint == rotated["key_thumbprint"]
    assert not (h.state_dir / "node.key.next").exists()
    d.stop()
    d2 = daemons(h.state_dir)
    d2.wait_event("connected")
    assert relay.run(h.node_id, "edge.ping").targets[0].outcome == OK


def test_revoked_daemon_stops(relay, daemons, tmp_path):
    h = enroll_host(relay, tmp_path / "h")
    d = daemons(h.state_dir)
    d.wait_event("connected")
    relay.revoke(h.node_id)
    assert d.wait_exit() == 3
    assert "revoked" in "\n".join(d.output.lines)
    assert d.status()["state"] == "revoked"
    # a restart does not retry for ever either
    d2 = daemons(h.state_dir)
    assert d2.wait_exit() == 3


def test_spool_survives_restart_and_capabilities_follow_config(relay, daemons, tmp_path):
    from aegis_edge_core import hoststate as hs
    from aegis_edge_core.wire import stream_pb2

    h = enroll_host(relay, tmp_path / "h")
    # a result a previous daemon finished but never got acknowledged
    leftover = stream_pb2.CommandResult(command_id="c-leftover", outcome=OK, error_kind=1)
    (h.state_dir / hs.RESULT_SPOOL).write_text(hs.encode_result_spool([leftover]))
    d = daemons(h.state_dir)
    d.wait_event("spool_loaded")
    d.wait_event("connected")
    wait_until(lambda: not (h.state_dir / hs.RESULT_SPOOL).exists(), what="leftover acked")

    cfg = h.state_dir / "aegis-config.yaml"
    cfg.write_text(cfg.read_text() + "labels:\n  role: db\n")
    d.wait_event("capabilities_changed")
    wait_until(
        lambda: relay.host(h.node_id).capabilities.labels.get("role") == "db",
        what="relay sees the new label",
    )


# What an idle daemon must not carry (docs/benchmarks.md, "Idle daemon RSS"): each was
# imported once and cut, so that a new import of any of them is a decision, not an accident.
NOT_ON_THE_DAEMON_PATH = (
    "importlib.metadata",  # entry points are read by aegis_edge_cli.entrypoints
    "email",
    "zipfile",
    "csv",
    "hashlib",  # SHA-256 through cryptography
    "difflib",  # only for a mistyped name
    "grpc_status",  # only once a call is refused
    "importlib.resources",  # tool schemas, on the first tool call
    "yaml",  # only with an aegis-config.yaml
    "aegis_edge_core.health",
    "aegis_edge_relay",
)


def test_connected_daemon_imports_only_what_it_runs(relay, tmp_path):
    host = enroll_host(relay, tmp_path / "h")
    (host.state_dir / "aegis-config.yaml").unlink()  # all defaults: no YAML to read
    d = DaemonProcess.start(host.state_dir, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        d.wait_event("connected")

        def imported() -> set[str]:
            return {
                line.split("|")[2].strip()
                for line in d.output.lines
                if line.startswith("import time:") and line.count("|") == 2
            }

        # Start-up's freed memory goes back to the OS once connected (glibc's malloc_trim,
        # through ctypes); by then the daemon has imported all it needs to sit idle.
        if sys.platform.startswith("linux"):
            wait_until(lambda: "ctypes" in imported(), 10, what="malloc_trim after start")
        modules = imported()
        assert {"aegis_edge_agent.daemon", "aegis_edge_core.session", "grpc"} <= modules
        unwanted = [
            m
            for m in modules
            if any(m == n or m.startswith(f"{n}.") for n in NOT_ON_THE_DAEMON_PATH)
        ]
        assert sorted(unwanted) == []
    finally:
        d.stop()
