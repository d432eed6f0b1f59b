"""Authorization of admin calls: who may call what, on which tenants.

An operator token names a subject, a role and the tenants it may touch (or all of them).
Roles are ordered ``viewer < operator < admin``; each admin RPC needs a minimum role
(:data:`REQUIRED_ROLES`). Tenant scoping is decided here too, with one rule that matters
for privacy: an object (daemon, fleet run) of a tenant outside the token's scope is
reported as *not found*, exactly as if it did not exist, so a token of tenant A learns
nothing about tenant B. Naming a foreign tenant explicitly (``--tenant B``) is refused as
*permission denied*, which reveals nothing either: the answer does not depend on whether B
exists.

Decisions are pure: :func:`authorize` raises :class:`AuthzError` whose ``grpc_status`` is
the status a server answers with (``PERMISSION_DENIED`` or ``NOT_FOUND``); the core does
not import grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity.tokens import TENANT_ID_PATTERN, TENANT_ID_RULE

__all__ = [
    "REQUIRED_ROLES",
    "AuthzError",
    "Principal",
    "Role",
    "authorize",
    "check_tenant",
    "parse_role",
    "require_visible",
    "scope_tenants",
]


class Role(enum.IntEnum):
    """Operator roles, ordered so that ``role >= Role.OPERATOR`` reads naturally."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_role(text: str) -> Role:
    """``"viewer"``, ``"operator"`` or ``"admin"`` (any case) as a :class:`Role`."""
    try:
        return Role[text.strip().upper()]
    except KeyError:
        raise AuthzError(
            f"unknown role {text!r}",
            grpc_status="INVALID_ARGUMENT",
            hint="use one of viewer, operator, admin",
        ) from None


REQUIRED_ROLES: Final[Mapping[str, Role]] = {
    "ListHosts": Role.VIEWER,
    "GetHost": Role.VIEWER,
    "PreviewFleetRun": Role.VIEWER,
    "WatchFleetRun": Role.VIEWER,
    "ListFleetRuns": Role.VIEWER,
    "GetFleetRun": Role.VIEWER,
    "ListGroups": Role.VIEWER,
    "GetGroup": Role.VIEWER,
    "AddTags": Role.OPERATOR,
    "RemoveTags": Role.OPERATOR,
    "StartFleetRun": Role.OPERATOR,
    "CancelFleetRun": Role.OPERATOR,
    "RerunFleetRun": Role.OPERATOR,
    "RevokeNode": Role.OPERATOR,
    "IssueEnrollmentToken": Role.OPERATOR,
    "CreateGroup": Role.OPERATOR,
    "DeleteGroup": Role.OPERATOR,
    "DeleteTenant": Role.ADMIN,
}
"""The least role each ``aegis.edge.v1.Admin`` RPC needs. An RPC not listed needs admin."""


class AuthzError(AegisError):
    """An admin call is refused; ``grpc_status`` is the status to answer with."""

    grpc_status: str

    def __init__(self, message: str, *, grpc_status: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.grpc_status = grpc_status


def _tenants(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError("tenants is a collection of tenant ids, not one string")
    return frozenset(value)


@attrs.frozen(kw_only=True)
class Principal:
    """Who is calling: the verified claims of an operator token.

    ``tenants`` is ``None`` for a token that may touch every tenant.
    """

    subject: str
    role: Role
    tenants: frozenset[str] | None = attrs.field(default=None, converter=_tenants)

    @property
    def all_tenants(self) -> bool:
        return self.tenants is None

    def sees(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    def sees_all(self, scope: Iterable[str] | None) -> bool:
        """May this principal see an object that spans ``scope`` (a fleet run's tenants)?

        Every one of them must be in its tenants; an object of unknown scope (``None``) is
        visible to an all-tenants token only."""
        if self.tenants is None:
            return True
        if scope is None:
            return False
        return set(scope) <= self.tenants


def authorize(principal: Principal, rpc: str) -> None:
    """Refuse with ``PERMISSION_DENIED`` if ``principal``'s role is below what ``rpc`` needs."""
    needed = REQUIRED_ROLES.get(rpc, Role.ADMIN)
    if principal.role < needed:
        raise AuthzError(
            f"{rpc} needs the {needed.label} role; this token has {principal.role.label}",
            grpc_status="PERMISSION_DENIED",
            hint="ask an admin for a token with a role that may do this "
            "(aegis relay operator-token --role ...)",
        )


def check_tenant(principal: Principal, tenant_id: str) -> None:
    """Refuse with ``PERMISSION_DENIED`` a request that names a tenant outside the scope."""
    if not principal.sees(tenant_id):
        raise AuthzError(
            f"this token is not scoped to tenant {tenant_id!r}",
            grpc_status="PERMISSION_DENIED",
            hint="use a token issued for that tenant",
        )


def require_visible(principal: Principal, tenant_id: str, what: str) -> None:
    """Refuse with ``NOT_FOUND`` an object of a tenant outside the scope.

    ``what`` names the object as the caller asked for it (``"daemon n-123"``); the message
    is the same one a missing object gets, so existence does not leak.
    """
    if not principal.sees(tenant_id):
        raise AuthzError(f"{what} not found", grpc_status="NOT_FOUND")


def scope_tenants(principal: Principal, requested: str = "") -> frozenset[str] | None:
    """The tenants a listing may include: ``None`` for every tenant.

    An empty ``requested`` means every tenant the token sees; a named one must be a tenant
    id (``INVALID_ARGUMENT`` otherwise: a NUL or a 10 kB name never reaches the store, even
    for a token that sees every tenant) and in scope.
    """
    if requested:
        if not TENANT_ID_PATTERN.fullmatch(requested):
            raise AuthzError(
                f"tenant id {requested!r} is not allowed",
                grpc_status="INVALID_ARGUMENT",
                hint=TENANT_ID_RULE,
            )
        check_tenant(principal, requested)
        return frozenset({requested})
    return principal.tenants
