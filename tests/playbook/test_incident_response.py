"""Seed: "Incident response patterns" -- single-key and blast-radius rotation."""

from __future__ import annotations

from .conftest import Playbook


def test_suspected_key_leak_one_host(playbook: Playbook) -> None:
    host, daemon = playbook.host("leaky")
    assert daemon is not None
    before = (host.state_dir / "node.key").read_bytes()
    # 1. aegis edge keys rotate                   # run on the host
    playbook.aegis("edge", "keys", "rotate", "--state-dir", str(host.state_dir))
    assert (host.state_dir / "node.key").read_bytes() != before
    daemon.wait_event("connected", count=2)  # back on the new key, by itself
    # 2. Check command history for unexpected dispatches.
    run = playbook.json(
        "edge", "fleet", "run", "--target", f"node={host.node_id}", "--tool", "edge.ping"
    )
    shown = playbook.json("edge", "show", host.node_id)
    assert any(c["command_id"] == run["targets"][0]["command_id"] for c in shown["history"])
    # ... or revoke-remote if you can't reach the host
    playbook.aegis("edge", "keys", "revoke-remote", host.node_id)
    assert playbook.status_of(host.node_id) == "Revoked"


def test_blast_radius_rotation_seed_line(playbook: Playbook) -> None:
    tagged = {}
    for name, tag in (("p1", "prod"), ("p2", "potentially-affected"), ("dev", "dev")):
        host, _ = playbook.host(name, tenant="blast")
        playbook.aegis("edge", "tag", "add", host.node_id, tag)
        tagged[host.node_id] = tag
    before = {h["node_id"]: h["key_thumbprint"] for h in playbook.json("edge", "ls")}
    # aegis edge fleet keys rotate --target tags=AnyOf(potentially-affected,prod)
    #   --mode rolling=10 --on-error continue
    record = playbook.json(
        "edge", "fleet", "keys", "rotate",
        "--target", "tags=AnyOf(potentially-affected,prod)",
        "--mode", "rolling=10", "--on-error", "continue",
    )  # fmt: skip
    assert record["outcome"] == "completed", record
    rotated = {t["node_id"] for t in record["targets"]}
    assert rotated == {n for n, tag in tagged.items() if tag != "dev"}
    after = {h["node_id"]: h["key_thumbprint"] for h in playbook.json("edge", "ls")}
    for node_id in tagged:
        assert (after[node_id] != before[node_id]) == (node_id in rotated)
    # The rotated daemons still take commands, on their new keys.
    ping = playbook.json(
        "edge",
        "fleet",
        "run",
        "--target",
        "tags=AnyOf(potentially-affected,prod)",
        "--tool",
        "edge.ping",
    )
    assert ping["outcome"] == "completed"
