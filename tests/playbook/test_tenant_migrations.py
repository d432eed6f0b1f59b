"""Seed: "Tenant migrations" -- revoke, fresh token in the new tenant, re-enroll."""

from __future__ import annotations

import json

from aegis_edge_core.wire import admin_pb2

from .conftest import Playbook


def test_migrate_by_revoke_and_re_enroll(playbook: Playbook) -> None:
    host, daemon = playbook.host("mover", tenant="old-tenant")
    assert daemon is not None
    # 1. Revoke the daemon under the old tenant.
    playbook.aegis("edge", "keys", "revoke-remote", host.node_id)
    assert daemon.wait_exit() != 0
    # 2. Issue a fresh enrollment token under the new tenant.
    token = playbook.aegis("edge", "tokens", "issue", "--tenant", "new-tenant").stdout.strip()
    # 3. Run aegis edge enroll <new-token> on the host (it replaces the revoked identity).
    playbook.aegis(
        "edge",
        "enroll",
        token,
        "--state-dir",
        str(host.state_dir),
        "--allow-tool",
        "cmd.run",
        "--force",
    )
    node = json.loads((host.state_dir / "node.json").read_text())
    assert node["tenant_id"] == "new-tenant" and node["node_id"] != host.node_id
    from tests.agent.harness import EnrolledHost

    moved = EnrolledHost(state_dir=host.state_dir, node_id=node["node_id"], tenant_id="new-tenant")
    playbook.start(moved)
    hosts = {h["node_id"]: h for h in playbook.json("edge", "ls")}
    assert hosts[host.node_id]["status"] == "Revoked"
    assert hosts[moved.node_id]["status"] == "Connected"
    assert hosts[moved.node_id]["tenant_id"] == "new-tenant"


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
