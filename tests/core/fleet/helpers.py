"""Builders shared by the fleet tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aegis_edge_core.fleet import DaemonSnapshot


def snap(
    node_id: str,
    *,
    status: str = "Connected",
    os: str = "linux",
    arch: str = "x86_64",
    tools: Iterable[str] = ("cmd.run", "keys.rotate", "sys.info", "edge.ping"),
    tags: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    tenant_id: str = "tenant-a",
) -> DaemonSnapshot:
    return DaemonSnapshot(
        node_id=node_id,
        tenant_id=tenant_id,
        status=status,
        os=os,
        arch=arch,
        tools=frozenset(tools),
        tags=frozenset(tags),
        labels=dict(labels or {}),
    )
