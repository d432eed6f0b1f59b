"""Hosts: ``ListHosts``, ``GetHost``, ``AddTags``/``RemoveTags``, ``RevokeNode``."""

from __future__ import annotations

from collections import Counter
from typing import Final

import grpc

from aegis_edge_core.authz import scope_tenants
from aegis_edge_core.fleet import parse_selector
from aegis_edge_core.fleet.snapshot import valid_tag
from aegis_edge_core.health import DaemonStatus
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay import jsonlog
from aegis_edge_relay.admin.auth import Context, abort, guard
from aegis_edge_relay.admin.groups import GroupsAdmin
from aegis_edge_relay.runstate import command_record

__all__ = ["HostsAdmin"]

DEFAULT_HISTORY: Final = 20


class HostsAdmin(GroupsAdmin):
    async def ListHosts(
        self, request: admin_pb2.ListHostsRequest, context: Context
    ) -> admin_pb2.ListHostsResponse:
        principal = await self._auth(context, "ListHosts")
        tenants = await guard(context, lambda: scope_tenants(principal, request.tenant_id))
        matches = None
        if request.selector:
            selector = await guard(context, lambda: parse_selector(request.selector))
            groups = await self._group_index(context, request.selector, selector, tenants)
            matches = await guard(context, lambda: selector.matcher(groups))
        fleet = self.fleet
        out = admin_pb2.ListHostsResponse()
        after = (request.after_tenant_id, request.after_node_id)
        limit = request.limit or None
        counts: Counter[str] = Counter()
        # One pass filters and counts every host; only the page's hosts are built into
        # messages, the expensive part (a console page of 100 out of 10k hosts).
        for node in sorted(fleet.nodes.values(), key=lambda n: (n.tenant_id, n.node_id)):
            if tenants is not None and node.tenant_id not in tenants:
                continue
            status = fleet.status_of(node.node_id)
            if request.connected_only and status is not DaemonStatus.CONNECTED:
                continue
            if matches is not None and not matches(node.snapshot(status.value)):
                continue
            counts[status.value] += 1
            if request.after_node_id and (node.tenant_id, node.node_id) <= after:
                continue
            if limit is not None and len(out.hosts) >= limit:
                out.more = True
                continue
            out.hosts.append(self._host(node))
        out.matched = counts.total()
        for name, count in sorted(counts.items()):
            out.status_counts[name] = count
        return out

    async def GetHost(self, request: admin_pb2.GetHostRequest, context: Context) -> admin_pb2.Host:
        principal = await self._auth(context, "GetHost")
        node = await self._node(context, principal, request.node_id)
        host = self._host(node)
        limit = min(request.history_limit or DEFAULT_HISTORY, 1000)
        rows = await self.db.call(self.store.command_history, node.node_id, limit)
        for row in rows:
            host.history.append(command_record(row))
        return host

    async def AddTags(self, request: admin_pb2.TagsRequest, context: Context) -> admin_pb2.Host:
        return await self._tags(request, context, "AddTags", add=True)

    async def RemoveTags(self, request: admin_pb2.TagsRequest, context: Context) -> admin_pb2.Host:
        return await self._tags(request, context, "RemoveTags", add=False)

    async def _tags(
        self, request: admin_pb2.TagsRequest, context: Context, rpc: str, *, add: bool
    ) -> admin_pb2.Host:
        principal = await self._auth(context, rpc)
        node = await self._node(context, principal, request.node_id)
        bad = [t for t in request.tags if not valid_tag(t)]
        if bad or not request.tags:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid tag {bad[0]!r}: 1-64 printable characters without spaces or ,()="
                if bad
                else "no tags given",
            )
        tags = set(node.tags)
        if add:
            tags |= set(request.tags)
        else:
            tags -= set(request.tags)
        await self.db.call(self.store.set_tags, node.node_id, sorted(tags))
        node.tags = tags
        jsonlog.log(
            "info",
            "node.tags_changed",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            tags=sorted(tags),
            by=principal.subject,
        )
        return self._host(node)

    async def RevokeNode(
        self, request: admin_pb2.RevokeNodeRequest, context: Context
    ) -> admin_pb2.Host:
        principal = await self._auth(context, "RevokeNode")
        node = await self._node(context, principal, request.node_id)
        reason = request.reason or f"revoked by {principal.subject}"
        if not node.revoked:
            await self.identity.revoke_node(node.node_id, reason)
        return self._host(node)
