"""Seed: "Monitoring daemon health" -- the CLI, metrics, and the Unhealthy rule."""

from __future__ import annotations

import os
import signal

from tests.agent.harness import wait_until

from .conftest import Playbook, metric_value


def test_from_the_cli(playbook: Playbook) -> None:
    web, _ = playbook.host("web", labels=("role=web",))
    idle, _ = playbook.host("idle", start=False)

    # aegis edge ls --connected            # only Connected hosts
    connected = playbook.json("edge", "ls", "--connected")
    ids = {h["node_id"] for h in connected}
    assert web.node_id in ids and idle.node_id not in ids
    assert all(h["status"] == "Connected" for h in connected)

    # aegis edge ls --output json          # full record per host
    full = {h["node_id"]: h for h in playbook.json("edge", "ls")}
    rec = full[web.node_id]
    assert rec["tenant_id"] == "acme" and rec["status"] == "Connected"
    caps = rec["capabilities"]
    assert caps["os"] and caps["arch"] and "cmd.run" in caps["tools"]
    assert caps["labels"] == {"role": "web"} and caps["tags"] == []
    assert full[idle.node_id]["status"] == "Disconnected"

    # last_heartbeat_at fills in once the first heartbeat (1 s interval here) arrives.
    wait_until(
        lambda: (
            next(h for h in playbook.json("edge", "ls") if h["node_id"] == web.node_id)[
                "last_heartbeat_at"
            ]
            is not None
        ),
        15,
        0.2,
        "last_heartbeat_at recorded",
    )

    # aegis edge status                    # local view from the host itself
    local = playbook.json("edge", "status", "--state-dir", str(web.state_dir))
    assert local["node_id"] == web.node_id and local["tenant_id"] == "acme"
    assert local["relay"] == playbook.relay.endpoint
    assert local["daemon_running"] is True


def test_unhealthy_after_stale_threshold_and_back(playbook: Playbook) -> None:
    # The module's relay runs a 1 s heartbeat and a 3 s stale threshold.
    host, daemon = playbook.host("sleepy")
    assert daemon is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # stream open, heartbeats stop
    try:
        playbook.wait_status(host.node_id, "Unhealthy", timeout=15)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    playbook.wait_status(host.node_id, "Connected", timeout=15)


def test_from_metrics(playbook: Playbook) -> None:
    host, _ = playbook.host("metered", tenant="metrics-t")
    wait_until(
        lambda: (
            metric_value(
                playbook.metrics(),
                "aegis_edge_daemons_total",
                status="Connected",
                tenant="metrics-t",
            )
            == 1.0
        ),
        15,
        0.2,
        "gauge shows the daemon Connected",
    )
    wait_until(
        lambda: (
            (
                metric_value(playbook.metrics(), "aegis_edge_heartbeats_total", tenant="metrics-t")
                or 0
            )
            > 0
        ),
        15,
        0.2,
        "heartbeats counted",
    )
    text = playbook.metrics()
    for name in (
        "aegis_edge_daemons_total",
        "aegis_edge_stream_seconds_total",
        "aegis_edge_heartbeats_total",
        "aegis_edge_commands_dispatched_total",
        "aegis_edge_command_duration_seconds",
        "aegis_edge_fleet_runs_total",
        "aegis_edge_fleet_targets_skipped_total",
    ):
        assert f"# TYPE {name} " in text, name
    assert host.node_id not in text  # one series per tenant and status, not per daemon
