"""The Admin API's gate: the operator token, the role, and the core's errors as statuses.

Every Admin call first verifies the operator token (``authorization: Bearer <token>``) with
the core's :class:`TokenVerifier` and then asks :mod:`aegis_edge_core.authz` whether the
role and tenants allow it: UNAUTHENTICATED for a bad token, PERMISSION_DENIED for a role
that may not, NOT_FOUND for another tenant's daemons, runs and groups (they do not exist
for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from aegis_edge_core.authz import AuthzError, Principal, authorize, parse_role
from aegis_edge_core.errors import AegisError
from aegis_edge_core.fleet import RunFinished
from aegis_edge_core.fleet.errors import SelectorError
from aegis_edge_core.fleet.rerun import RerunRefused
from aegis_edge_core.identity import Revocations, TokenError, TokenVerifier

__all__ = ["Context", "abort", "authenticate", "guard"]

Context = grpc.aio.ServicerContext[Any, Any]


def _code(name: str) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, name, grpc.StatusCode.PERMISSION_DENIED)
    return code


async def abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable")  # pragma: no cover


async def guard(context: Context, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn the core's bad-input errors into the right status."""
    try:
        return fn()
    except AuthzError as err:
        await abort(context, _code(err.grpc_status), str(err))
    except RerunRefused as err:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
    except RunFinished as err:
        await abort(context, _code(err.grpc_status), str(err))
    except SelectorError as err:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, err.render())
    except AegisError as err:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))


async def authenticate(
    context: Context, rpc: str, *, verifier: TokenVerifier, revocations: Revocations, now: float
) -> Principal:
    """The caller of ``rpc``, or an abort naming what is wrong with its token or role."""
    value = ""
    for key, val in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            value = val if isinstance(val, str) else val.decode("ascii", "replace")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        await abort(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            "no operator token: send metadata 'authorization: Bearer <token>' "
            "(aegis relay operator-token prints one)",
        )
    try:
        claims = verifier.verify_operator_token(token.strip(), now=now, revocations=revocations)
    except TokenError as err:
        await abort(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            f"operator token refused: {err.message}; {err.hint}",
        )
    principal = Principal(
        subject=claims.subject,
        role=parse_role(claims.role),
        tenants=None if claims.all_tenants else claims.tenants,
    )
    try:
        authorize(principal, rpc)
    except AuthzError as err:
        await abort(context, _code(err.grpc_status), str(err))
    return principal
