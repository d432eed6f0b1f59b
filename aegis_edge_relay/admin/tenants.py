"""Tenants: ``IssueEnrollmentToken`` and ``DeleteTenant``."""

from __future__ import annotations

import grpc

from aegis_edge_core.authz import check_tenant
from aegis_edge_core.errors import AegisError
from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.admin.auth import Context, abort, guard
from aegis_edge_relay.admin.base import AdminBase

__all__ = ["TenantsAdmin"]

MAX_ENROLLMENT_TTL = 30 * 86400.0


class TenantsAdmin(AdminBase):
    async def IssueEnrollmentToken(
        self, request: admin_pb2.IssueEnrollmentTokenRequest, context: Context
    ) -> admin_pb2.IssueEnrollmentTokenResponse:
        principal = await self._auth(context, "IssueEnrollmentToken")
        tenant = request.tenant_id
        if not tenant and principal.tenants is not None and len(principal.tenants) == 1:
            (tenant,) = principal.tenants
        if not tenant:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")
        await guard(context, lambda: check_tenant(principal, tenant))
        if await self.db.call(self.store.is_tenant_deleted, tenant):
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {tenant!r} was deleted and takes no new daemons",
            )
        ttl = request.ttl_secs or 15 * 60.0
        if not 0 < ttl <= MAX_ENROLLMENT_TTL:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "ttl must be between 0 and 30 days"
            )
        try:
            token, expires = self.identity.issue_enrollment_token(tenant, ttl)
        except (ValueError, AegisError) as err:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return admin_pb2.IssueEnrollmentTokenResponse(token=token, expires_at=expires)

    async def DeleteTenant(
        self, request: admin_pb2.DeleteTenantRequest, context: Context
    ) -> admin_pb2.DeleteTenantResponse:
        principal = await self._auth(context, "DeleteTenant")
        if not request.tenant_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")
        await guard(context, lambda: check_tenant(principal, request.tenant_id))
        count = await self.identity.delete_tenant(request.tenant_id)
        return admin_pb2.DeleteTenantResponse(revoked_daemons=count)
