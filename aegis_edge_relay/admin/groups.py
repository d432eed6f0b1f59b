"""Saved groups: ``CreateGroup``, ``ListGroups``, ``GetGroup``, ``DeleteGroup``, and the
lookup of the groups a selector names (``group=web``).

Saved groups are looked up in the tenants the request may touch: ``tenant_id`` if the
request names one, else every tenant of the token. A name that more than one of those
tenants defines is refused (INVALID_ARGUMENT, at its column) until the request names the
tenant -- an all-tenants token never picks one silently.
"""

from __future__ import annotations

import grpc

from aegis_edge_core.authz import Principal, check_tenant, scope_tenants
from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import Group, GroupIndex, Selector, index_groups, parse_selector
from aegis_edge_core.fleet.groups import check_group_name
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay import jsonlog
from aegis_edge_relay.admin.auth import Context, abort, guard
from aegis_edge_relay.admin.base import AdminBase
from aegis_edge_relay.store import GroupExists, GroupRow

__all__ = ["GroupsAdmin"]


def _group_of(row: GroupRow) -> Group:
    return Group(name=row.name, tenant_id=row.tenant_id, selector=row.selector, pinned=row.pinned)


class GroupsAdmin(AdminBase):
    async def _groups_of(self, tenants: frozenset[str] | None) -> list[tuple[GroupRow, Group]]:
        """The stored groups of ``tenants`` (None: all) as core values.

        A row the core refuses (written by a version with other rules) is logged and
        left out rather than failing every run that names some other group.
        """
        rows = await self.db.call(self.store.list_groups, tenants)
        out = []
        for row in rows:
            try:
                out.append((row, _group_of(row)))
            except AegisError as err:
                jsonlog.log(
                    "warning",
                    "group.invalid",
                    tenant_id=row.tenant_id,
                    name=row.name,
                    error=str(err),
                )
        return out

    async def _group_index(
        self,
        context: Context,
        text: str,
        selector: Selector,
        tenants: frozenset[str] | None,
    ) -> GroupIndex | None:
        """The groups a selector names may come from, or None if it names none.

        Parses ``text`` again against them, so an unknown or ambiguous group is refused
        with the column in what the operator typed.
        """
        if not selector.group_names:
            return None
        index = index_groups(group for _row, group in await self._groups_of(tenants))
        await guard(context, lambda: parse_selector(text, groups=index))
        return index

    async def _group_tenant(self, context: Context, principal: Principal, requested: str) -> str:
        """The one tenant a new group belongs to: the request's, or the token's only one."""
        tenant = requested
        if not tenant and principal.tenants is not None and len(principal.tenants) == 1:
            (tenant,) = principal.tenants
        if not tenant:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "tenant_id is required: this token may touch several tenants and a group "
                "belongs to one (--tenant)",
            )
        await guard(context, lambda: check_tenant(principal, tenant))
        return tenant

    async def _find_group(
        self, context: Context, principal: Principal, request: admin_pb2.GetGroupRequest
    ) -> tuple[GroupRow, Group]:
        name = request.name
        await guard(context, lambda: check_group_name(name))
        if request.tenant_id:
            await guard(context, lambda: check_tenant(principal, request.tenant_id))
            tenants: frozenset[str] | None = frozenset({request.tenant_id})
        else:
            tenants = principal.tenants
        found = [(row, g) for row, g in await self._groups_of(tenants) if row.name == name]
        if not found:
            where = f" in tenant {request.tenant_id!r}" if request.tenant_id else ""
            await abort(context, grpc.StatusCode.NOT_FOUND, f"group {name!r} not found{where}")
        if len(found) > 1:
            names = ", ".join(row.tenant_id for row, _ in found)
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group {name!r} exists in tenants {names}: name one (--tenant)",
            )
        return found[0]

    def _group_proto(
        self, row: GroupRow, group: Group, *, with_members: bool = False
    ) -> admin_pb2.Group:
        out = admin_pb2.Group(
            name=group.name,
            tenant_id=group.tenant_id,
            selector=str(group.selector),
            pinned=list(group.pinned),
            created_at=row.created_at,
            created_by=row.created_by,
        )
        if with_members:
            snapshots = self.fleet.snapshots(frozenset({group.tenant_id}))
            out.members.extend(group.members(snapshots))
            out.missing.extend(group.missing(snapshots))
        return out

    async def CreateGroup(
        self, request: admin_pb2.CreateGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "CreateGroup")
        tenant = await self._group_tenant(context, principal, request.tenant_id)
        group: Group = await guard(
            context,
            lambda: Group(
                name=request.name,
                tenant_id=tenant,
                selector=request.selector,
                pinned=list(request.pinned),
            ),
        )
        for node_id in group.pinned:
            node = self.fleet.nodes.get(node_id)
            if node is None or node.tenant_id != tenant:
                # The same answer whether the node is unknown or another tenant's.
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"pinned daemon {node_id!r} not found in tenant {tenant!r}",
                )
        if await self.db.call(self.store.is_tenant_deleted, tenant):
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {tenant!r} was deleted and takes no new groups",
            )
        row = GroupRow(
            tenant_id=tenant,
            name=group.name,
            selector=str(group.selector),
            pinned=group.pinned,
            created_at=self.now(),
            created_by=principal.subject,
        )
        try:
            await self.db.call(self.store.create_group, row)
        except GroupExists as err:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(err))
        jsonlog.log(
            "info",
            "group.created",
            tenant_id=tenant,
            name=group.name,
            selector=str(group.selector),
            pinned=len(group.pinned),
            by=principal.subject,
        )
        return self._group_proto(row, group, with_members=True)

    async def ListGroups(
        self, request: admin_pb2.ListGroupsRequest, context: Context
    ) -> admin_pb2.ListGroupsResponse:
        principal = await self._auth(context, "ListGroups")
        tenants = await guard(context, lambda: scope_tenants(principal, request.tenant_id))
        out = admin_pb2.ListGroupsResponse()
        for row, group in await self._groups_of(tenants):
            out.groups.append(self._group_proto(row, group))
        return out

    async def GetGroup(
        self, request: admin_pb2.GetGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "GetGroup")
        row, group = await self._find_group(context, principal, request)
        return self._group_proto(row, group, with_members=True)

    async def DeleteGroup(
        self, request: admin_pb2.GetGroupRequest, context: Context
    ) -> admin_pb2.Group:
        principal = await self._auth(context, "DeleteGroup")
        row, group = await self._find_group(context, principal, request)
        await self.db.call(self.store.delete_group, row.tenant_id, row.name)
        jsonlog.log(
            "info", "group.deleted", tenant_id=row.tenant_id, name=row.name, by=principal.subject
        )
        return self._group_proto(row, group)
