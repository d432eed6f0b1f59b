"""Errors as ``application/problem+json`` (RFC 9457), from the gRPC status the servicer set.

``detail`` is the relay's sentence, the same the CLI prints; ``status`` comes from the one
table below, so a status means the same over HTTP as over gRPC.
"""

from __future__ import annotations

import json
from typing import Any, Final

import grpc
from aiohttp import web

__all__ = ["HTTP_STATUS", "PROBLEM_TYPE", "problem"]

PROBLEM_TYPE: Final = "application/problem+json"

HTTP_STATUS: Final[dict[grpc.StatusCode, int]] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}


def problem(
    code: grpc.StatusCode, detail: str, *, status: int | None = None, **extra: Any
) -> web.Response:
    """A problem response for ``code`` with ``detail``; ``type`` names the gRPC status.

    ``status`` overrides the table only where HTTP has its own word (405).
    """
    status = status or HTTP_STATUS.get(code, 500)
    name = code.name.lower()
    body: dict[str, Any] = {
        "type": f"urn:aegis-edge:problem:{name}",
        "title": name.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        **extra,
    }
    headers = {"Content-Type": PROBLEM_TYPE}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="aegis-relay-api"'
    return web.Response(status=status, text=json.dumps(body), headers=headers)
