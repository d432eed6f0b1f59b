"""Seed: "Tenant migrations" -- revoke, fresh token in the new tenant, re-enroll."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from aegis_edge_core.wire import admin_pb2

from .conftest import CLI, Playbook


def test_migrate_by_revoke_and_re_enroll_as_typed(playbook: Playbook, tmp_path: Path) -> None:
    """The seed's three steps, each command exactly as the seed types it.

    The host uses the default state directory (a fresh HOME), so no ``--state-dir`` and no
    ``--force`` appear anywhere: the daemon was told it is revoked, and that is what lets
    ``aegis edge enroll <new-token>`` replace the dead identity.
    """
    home = tmp_path / "home"
    home.mkdir()
    host_env = dict(playbook.env, HOME=str(home))
    state = home / ".aegis" / "edge"
    first = playbook.aegis("edge", "tokens", "issue", "--tenant", "old-tenant").stdout.strip()
    playbook.aegis("edge", "enroll", first, "--allow-tool", "cmd.run", env=host_env)
    old_node = json.loads((state / "node.json").read_text())["node_id"]
    daemon = subprocess.Popen(
        [*CLI, "edge", "daemon"], env=host_env, stderr=subprocess.PIPE, text=True
    )
    try:
        playbook.aegis("edge", "wait", env=host_env)

        # 1. Revoke the daemon under the old tenant.
        playbook.aegis("edge", "keys", "revoke-remote", old_node)
        _, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 3
    plain = [line for line in err.splitlines() if not line.startswith("{")]
    # The advice once, in the daemon's own words; the relay's sentence stays in the logs.
    assert plain == [
        f"aegis: the relay revoked node {old_node}; "
        "re-enroll with a fresh enrollment token (aegis edge enroll <token>)"
    ]
    assert (state / "revoked.json").exists()

    # 2. Issue a fresh enrollment token under the new tenant.
    token = playbook.aegis("edge", "tokens", "issue", "--tenant", "new-tenant").stdout.strip()

    # 3. Run aegis edge enroll <new-token> on the host.
    done = playbook.aegis("edge", "enroll", token, env=host_env)
    node = json.loads((state / "node.json").read_text())
    assert node["tenant_id"] == "new-tenant" and node["node_id"] != old_node
    assert f"enrolled node {node['node_id']} (tenant new-tenant)" in done.stdout
    assert not (state / "revoked.json").exists()

    daemon = subprocess.Popen([*CLI, "edge", "daemon"], env=host_env, stderr=subprocess.DEVNULL)
    try:
        playbook.aegis("edge", "wait", env=host_env)
        hosts = {h["node_id"]: h for h in playbook.json("edge", "ls")}
        assert hosts[old_node]["status"] == "Revoked"
        assert hosts[old_node]["tenant_id"] == "old-tenant"
        assert hosts[node["node_id"]]["status"] == "Connected"
        assert hosts[node["node_id"]]["tenant_id"] == "new-tenant"
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_enroll_over_a_live_enrollment_still_needs_force(playbook: Playbook) -> None:
    # Not revoked, not logged out: the identity is alive, and enroll does not clobber it.
    host, _ = playbook.host("keeper", tenant="old-tenant", start=False)
    token = playbook.aegis("edge", "tokens", "issue", "--tenant", "new-tenant").stdout.strip()
    done = playbook.aegis("edge", "enroll", token, "--state-dir", str(host.state_dir), check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"aegis: {host.state_dir} already holds an enrollment")
    assert "pass --force to replace it" in done.stderr
    node = json.loads((host.state_dir / "node.json").read_text())
    assert node["node_id"] == host.node_id  # nothing was replaced


def test_migrate_by_logout(playbook: Playbook) -> None:
    host, _ = playbook.host("leaver", tenant="old-tenant")
    playbook.aegis("edge", "logout", "--state-dir", str(host.state_dir))
    token = playbook.aegis("edge", "tokens", "issue", "--tenant", "new-tenant").stdout.strip()
    playbook.aegis("edge", "enroll", token, "--state-dir", str(host.state_dir))
    node = json.loads((host.state_dir / "node.json").read_text())
    assert node["tenant_id"] == "new-tenant"


def test_there_is_no_transfer_operation() -> None:
    # By design: the binding is an identity claim; claims are reissued, not transferred.
    rpcs = [m.name.lower() for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods]
    assert not [r for r in rpcs if "transfer" in r or "migrate" in r or r.startswith("move")]
    assert "tenant_id" not in admin_pb2.TagsRequest.DESCRIPTOR.fields_by_name
