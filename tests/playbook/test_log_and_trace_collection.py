"""Seed: "Log and trace collection" -- JSON log lines with the seed's fields."""

from __future__ import annotations

from .conftest import Playbook


def test_logs_are_json_with_the_seed_fields(playbook: Playbook) -> None:
    host, daemon = playbook.host("logger")
    assert daemon is not None
    run = playbook.json(
        "edge", "fleet", "run", "--target", f"node={host.node_id}", "--tool", "cmd.run",
        "--arg", "cmd=echo hello",
    )  # fmt: skip
    assert run["outcome"] == "completed"
    command_id = run["targets"][0]["command_id"]
    events = daemon.events()
    assert events, "the daemon logs JSON lines on stderr"
    for line in events:
        assert {"timestamp", "level", "event"} <= line.keys(), line
    connected = next(e for e in events if e["event"] == "connected")
    assert connected["node_id"] == host.node_id and connected["tenant_id"] == "acme"
    daemon.wait_event("command_finished", pred=lambda e: e.get("command_id") == command_id)
    token = (host.state_dir / "node.token").read_text().strip()
    assert all(token not in line for line in daemon.output.lines), "a token reached the logs"


def test_trace_correlation_fleet_command_id(playbook: Playbook) -> None:
    host, _ = playbook.host("traced")
    run = playbook.json(
        "edge", "fleet", "run", "--target", f"node={host.node_id}", "--tool", "edge.ping",
    )  # fmt: skip
    # One trace per run, started at the dispatcher; the run record names it, so the
    # fleet_command_id leads to the trace in a tracing UI.
    shown = playbook.json("edge", "fleet", "show", run["fleet_command_id"])
    assert shown["trace_id"] and len(shown["trace_id"]) == 32
