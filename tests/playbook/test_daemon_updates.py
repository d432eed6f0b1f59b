"""Seed: "Daemon updates" -- single-host restart and the fleet-wide rolling update."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Playbook

# The seed's line, flag for flag (`/opt/aegis/upgrade.sh` does not exist on test hosts).
SEED_UPGRADE = [
    "edge", "fleet", "run",
    "--target", "tags=managed-fleet",
    "--tool", "cmd.run", "--arg",
    "cmd=/opt/aegis/upgrade.sh && systemctl --user restart aegis-edge.service",
    "--mode", "rolling=5",
    "--on-error", "stop-after=1",
    "--deadline", "120s",
]  # fmt: skip


def test_single_host_update_reconnects_with_existing_key_and_token(playbook: Playbook) -> None:
    host, daemon = playbook.host("single")
    assert daemon is not None
    key = (host.state_dir / "node.key").read_bytes()
    # 2. Restart the service: the stream drops, the daemon reconnects with its key and token.
    daemon.stop()
    again = playbook.start(host)
    assert (host.state_dir / "node.key").read_bytes() == key
    # 3. Verify.
    local = playbook.json("edge", "status", "--state-dir", str(host.state_dir))
    assert local["daemon_running"] is True and local["node_id"] == host.node_id
    playbook.wait_status(host.node_id, "Connected")
    assert again.proc.poll() is None


def test_in_flight_tool_reported_edge_disconnected(playbook: Playbook) -> None:
    host, daemon = playbook.host("busy")
    assert daemon is not None
    events = playbook.relay.start_run(host.node_id, "cmd.run", {"cmd": "sleep 30"})
    run_id = next(iter(events)).started.fleet_command_id
    daemon.wait_event("command_received")
    daemon.proc.kill()  # the service restart takes the stream down mid-command
    daemon.proc.wait()
    finished = [e.finished for e in events if e.WhichOneof("body") == "finished"]
    assert finished and finished[0].fleet_command_id == run_id
    record = playbook.json("edge", "fleet", "show", run_id)
    assert record["targets"][0]["outcome"] == "edge_disconnected"


def _managed_fleet(playbook: Playbook, n: int) -> list[str]:
    ids = []
    for i in range(n):
        host, _ = playbook.host(f"m{i}", tenant="updates")
        playbook.aegis("edge", "tag", "add", host.node_id, "managed-fleet")
        ids.append(host.node_id)
    return ids


def test_fleet_wide_update_seed_line_halts_on_first_failure(playbook: Playbook) -> None:
    ids = _managed_fleet(playbook, 6)
    done = playbook.aegis(*SEED_UPGRADE, "--output", "json", check=False)
    assert done.returncode != 0, "a run that did not complete exits non-zero"
    record = json.loads(done.stdout)
    assert record["outcome"] == "halted"
    outcomes = {t["node_id"]: t["outcome"] for t in record["targets"]}
    assert set(outcomes) == set(ids)
    # rolling=5: five dispatched at once, all fail (no upgrade script on these hosts); the
    # sixth is never started.
    assert sorted(outcomes.values()).count("not_started") == 1
    assert {s["reason"] for s in record["skipped"] if s["node_id"] in ids} == {"halted"}


def test_fleet_wide_update_completes_when_the_script_works(
    playbook: Playbook, tmp_path: Path
) -> None:
    _managed_fleet(playbook, 3)
    script = tmp_path / "upgrade.sh"
    script.write_text("#!/bin/sh\necho upgraded\n")
    script.chmod(0o755)
    argv = list(SEED_UPGRADE)
    argv[argv.index("--arg") + 1] = f"cmd={script}"
    record = playbook.json(*argv)
    assert record["outcome"] == "completed"
    assert {t["outcome"] for t in record["targets"]} == {"ok"}
