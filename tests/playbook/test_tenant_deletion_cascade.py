"""Seed: "Tenant-deletion cascade" -- every daemon of the tenant revoked, nothing orphaned."""

from __future__ import annotations

from .conftest import Playbook


def test_deleting_a_tenant_revokes_its_daemons(playbook: Playbook) -> None:
    a1, d1 = playbook.host("a1", tenant="doomed")
    a2, _ = playbook.host("a2", tenant="doomed", start=False)
    other, _ = playbook.host("b1", tenant="survivor")
    done = playbook.aegis("edge", "tenants", "delete", "doomed", "--yes")
    assert "revoked 2 " in done.stdout, done.stdout
    hosts = {h["node_id"]: h for h in playbook.json("edge", "ls")}
    assert hosts[a1.node_id]["status"] == "Revoked"
    assert hosts[a2.node_id]["status"] == "Revoked"
    assert hosts[other.node_id]["status"] == "Connected"
    assert d1 is not None and d1.wait_exit() != 0  # its stream was dropped and refused
    # No orphaned state: the tenant takes no new daemons either.
    refused = playbook.aegis("edge", "tokens", "issue", "--tenant", "doomed", check=False)
    assert refused.returncode != 0 and "deleted" in refused.stderr
    assert refused.stdout == ""
