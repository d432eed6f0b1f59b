"""Seed: "Decommissioning a host" -- host-side and operator-side."""

from __future__ import annotations

import shutil

from .conftest import Playbook


def test_host_side_logout_uninstall_purge(playbook: Playbook) -> None:
    host, daemon = playbook.host("retiring")
    assert daemon is not None
    state = str(host.state_dir)
    # aegis edge logout                # deletes node.token, node.key
    playbook.aegis("edge", "logout", "--state-dir", state)
    assert not (host.state_dir / "node.token").exists()
    assert not (host.state_dir / "node.key").exists()
    assert daemon.wait_exit() == 0
    # aegis edge service uninstall     # removes the service unit (none installed: says so)
    # (HOME points into the test's directory: never touch the real user's units.)
    done = playbook.aegis(
        "edge", "service", "uninstall", "--state-dir", state,
        env=dict(playbook.env, HOME=str(playbook.tmp)),
    )  # fmt: skip
    assert "no service unit" in done.stdout
    # rm -rf ~/.aegis/edge             # purge state
    shutil.rmtree(host.state_dir)
    # The remote row remains, Disconnected, until an operator revokes it explicitly.
    playbook.wait_status(host.node_id, "Disconnected")


def test_operator_side_revoke_remote(playbook: Playbook) -> None:
    host, daemon = playbook.host("unreachable")
    assert daemon is not None
    # aegis edge keys revoke-remote <node-id>
    playbook.aegis("edge", "keys", "revoke-remote", host.node_id)
    assert playbook.status_of(host.node_id) == "Revoked"
    # The stream is dropped and the next reconnect fails attestation: the daemon says so
    # plainly and stops instead of retrying for ever.
    assert daemon.wait_exit() != 0
    assert any("revoked" in line for line in daemon.output.lines)
    local = playbook.json("edge", "status", "--state-dir", str(host.state_dir))
    assert "revoked" in (local["last_error"] or "") + local["connection_state"]
    again = playbook.aegis(
        "edge", "daemon", "--state-dir", str(host.state_dir), check=False, timeout=60
    )
    assert again.returncode != 0 and "revoked" in again.stderr
