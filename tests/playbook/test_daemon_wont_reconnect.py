"""Seed: "Daemon won't reconnect" -- each of the five checks gives the operator an answer."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from .conftest import Playbook


def test_1_is_it_running(playbook: Playbook) -> None:
    host, daemon = playbook.host("stopped")
    assert daemon is not None
    daemon.stop()
    local = playbook.json("edge", "status", "--state-dir", str(host.state_dir))
    assert local["daemon_running"] is False
    assert local["connection_state"].startswith("not running")
    table = playbook.aegis("edge", "status", "--state-dir", str(host.state_dir)).stdout
    assert "not running" in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_2_and_3_last_error_names_the_unreachable_relay(playbook: Playbook) -> None:
    host, _ = playbook.host("cut-off", start=False)
    node = json.loads((host.state_dir / "node.json").read_text())
    nowhere = f"127.0.0.1:{_free_port()}"
    node["relay"] = nowhere
    (host.state_dir / "node.json").write_text(json.dumps(node))
    cfg = host.state_dir / "aegis-config.yaml"
    cfg.write_text(cfg.read_text().replace(playbook.relay.endpoint, nowhere))
    from tests.agent.harness import DaemonProcess

    daemon = DaemonProcess.start(host.state_dir)
    playbook.daemons.append(daemon)
    failed = daemon.wait_event("connect_failed")
    assert nowhere in failed["error"]
    daemon.wait_event("reconnect_backoff")
    local = playbook.json("edge", "status", "--state-dir", str(host.state_dir))
    assert nowhere in (local["last_error"] or ""), local


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt: faketime)")
def test_4_clock_skew_is_named_with_the_offset(playbook: Playbook) -> None:
    host, _ = playbook.host("skewed", start=False)
    import os

    from tests.agent.harness import DaemonProcess

    env = {
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "FAKETIME": "+1h",
        "FAKETIME_DONT_RESET": "1",
    }
    if not os.path.exists(env["LD_PRELOAD"]):
        pytest.skip("libfaketime not at the Debian path")
    daemon = DaemonProcess.start(host.state_dir, env=env)
    playbook.daemons.append(daemon)
    failed = daemon.wait_event("connect_failed")
    assert "clock" in failed["error"] and "3600" in failed["error"], failed
    local = playbook.json("edge", "status", "--state-dir", str(host.state_dir))
    assert "clock" in (local["last_error"] or "")


def test_5_revoked_server_side_says_re_enroll(playbook: Playbook) -> None:
    host, daemon = playbook.host("banned")
    assert daemon is not None
    playbook.aegis("edge", "keys", "revoke-remote", host.node_id)
    assert daemon.wait_exit() != 0
    said = "\n".join(daemon.output.lines)
    assert "revoked" in said and "enroll" in said
