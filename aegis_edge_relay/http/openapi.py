"""The OpenAPI 3.1 document of ``/api/v1``, built from :data:`~.routes.ROUTES`.

The parameters come from the same declarations the API parses with, and the answer schemas
below describe exactly what :mod:`.representation` produces (``additionalProperties:
false``: a field added there and not here fails the schema checks). The built document is
kept in the repository as ``openapi.json`` beside this file and served from there;
``python scripts/gen_openapi.py`` rewrites it, ``--check`` fails when it is stale.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Final

from aegis_edge_relay.http.params import Param
from aegis_edge_relay.http.routes import API_PREFIX, ROUTES, Route

__all__ = ["OPENAPI_PATH", "build_document", "committed_document", "render"]

OPENAPI_PATH: Final = f"{API_PREFIX}/openapi.json"

_STR: Final = {"type": "string"}
_STR_OR_NULL: Final = {"type": ["string", "null"]}
_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_INT_OR_NULL: Final = {"type": ["integer", "null"]}
_STRS: Final = {"type": "array", "items": _STR}
_TARGET_OUTCOMES: Final = [
    "ok",
    "error",
    "timeout",
    "cancelled",
    "denied",
    "edge_disconnected",
    "not_started",
    "running",
    "pending",
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(props: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": [k for k in props if k not in optional],
        "additionalProperties": False,
    }


def _schemas() -> dict[str, Any]:
    host = {
        "node_id": _STR,
        "tenant_id": _STR,
        "status": {"enum": ["Connected", "Unhealthy", "Disconnected", "Revoked", "Unknown"]},
        "last_heartbeat_at": _TIME,
        "enrolled_at": _TIME,
        "connected_since": _TIME,
        "capabilities": _ref("Capabilities"),
        "key_thumbprint": _STR_OR_NULL,
        "revoked_reason": _STR_OR_NULL,
    }
    group = {
        "name": _STR,
        "tenant_id": _STR,
        "selector": _STR,
        "pinned": _STRS,
        "created_at": _TIME,
        "created_by": _STR_OR_NULL,
    }
    skipped = _ref("SkippedTarget")
    return {
        "Problem": {
            **_object(
                {
                    "type": _STR,
                    "title": _STR,
                    "status": {"type": "integer"},
                    "detail": {
                        "type": "string",
                        "description": "the relay's sentence, as the CLI prints it",
                    },
                }
            ),
            "additionalProperties": True,
        },
        "Capabilities": _object(
            {
                "os": _STR,
                "arch": _STR,
                "tools": _STRS,
                "labels": {"type": "object", "additionalProperties": _STR},
                "tags": _STRS,
                "hostname": _STR,
                "agent_version": _STR,
            }
        ),
        "CommandRecord": _object(
            {
                "command_id": _STR,
                "fleet_command_id": _STR_OR_NULL,
                "tool": _STR,
                "outcome": {"enum": _TARGET_OUTCOMES},
                "exit_code": _INT_OR_NULL,
                "dispatched_at": _TIME,
                "finished_at": _TIME,
                "error_message": _STR_OR_NULL,
                "result": {"description": "the tool's structured result (JSON), or null"},
                "stdout_tail": _STR_OR_NULL,
                "stderr_tail": _STR_OR_NULL,
            }
        ),
        "Host": _object(host),
        "HostDetail": _object(
            {**host, "history": {"type": "array", "items": _ref("CommandRecord")}}
        ),
        "HostPage": _object(
            {
                "hosts": {"type": "array", "items": _ref("Host")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "pass as 'after' for the next page; null on the last",
                },
                "matched": {
                    "type": "integer",
                    "description": "hosts matching the request, on every page",
                },
                "status_counts": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                    "description": "of the matching hosts, how many per status",
                },
            }
        ),
        "TenantDeleted": _object({"tenant_id": _STR, "revoked_daemons": {"type": "integer"}}),
        "EnrollmentToken": _object({"token": _STR, "expires_at": _TIME}),
        "SkippedTarget": _object({"node_id": _STR, "reason": _STR}),
        "FleetSpec": _object(
            {
                "selector": _STR,
                "tool": _STR,
                "args": {"description": "the plain arguments; secret ones shown redacted"},
                "secret_args": _STRS,
                "mode": _STR,
                "on_error": _STR,
                "deadline_secs": {"type": ["number", "null"]},
                "canary": _INT_OR_NULL,
                "tenant_id": _STR_OR_NULL,
            }
        ),
        "TargetResult": _object(
            {
                "node_id": _STR,
                "tenant_id": _STR_OR_NULL,
                "command_id": _STR_OR_NULL,
                "outcome": {"enum": _TARGET_OUTCOMES},
                "exit_code": _INT_OR_NULL,
                "error_message": _STR_OR_NULL,
                "skip_reason": _STR_OR_NULL,
                "ended_by": _STR_OR_NULL,
                "dispatched_at": _TIME,
                "finished_at": _TIME,
                "duration_secs": {"type": ["number", "null"]},
                "stdout_tail": _STR_OR_NULL,
                "stderr_tail": _STR_OR_NULL,
                "result": {"description": "the tool's structured result (JSON), or null"},
            }
        ),
        "FleetRun": _object(
            {
                "fleet_command_id": _STR,
                "outcome": {
                    "enum": [
                        "running",
                        "completed",
                        "completed_with_errors",
                        "halted",
                        "deadline_exceeded",
                        "cancelled",
                        "unknown",
                    ]
                },
                "tool": _STR,
                "selector": _STR,
                "spec": _ref("FleetSpec"),
                "created_at": _TIME,
                "finished_at": _TIME,
                "created_by": _STR_OR_NULL,
                "trace_id": _STR_OR_NULL,
                "halt_reason": _STR_OR_NULL,
                "rerun_of": _STR_OR_NULL,
                "targets": {
                    "type": "array",
                    "items": _ref("TargetResult"),
                    "description": "left out in lists (counts say how the run went)",
                },
                "skipped": {"type": "array", "items": skipped},
                "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
            optional=("targets",),
        ),
        "FleetRunList": _object({"runs": {"type": "array", "items": _ref("FleetRun")}}),
        "FleetPreview": _object(
            {
                "selector": _STR,
                "matched": {"type": "integer"},
                "targets": _STRS,
                "skipped": {"type": "array", "items": skipped},
            }
        ),
        "Group": _object(group),
        "GroupDetail": _object({**group, "members": _STRS, "missing": _STRS}),
        "GroupList": _object({"groups": {"type": "array", "items": _ref("Group")}}),
    }


def _param_schema(param: Param) -> dict[str, Any]:
    kind = param.kind
    if kind == "strings":
        return dict(_STRS)
    if kind == "object":
        return {"type": "object"}
    out: dict[str, Any] = {"type": kind}
    if param.minimum is not None:
        out["minimum"] = param.minimum if kind == "number" else int(param.minimum)
    if param.maximum is not None:
        out["maximum"] = param.maximum if kind == "number" else int(param.maximum)
    if kind == "string" and param.where == "path":
        out["minLength"] = 1
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": f"The Admin API's `{route.rpc}`, with the same authorization.",
    }
    params = [
        {
            "name": p.name,
            "in": p.where,
            "required": p.required or p.where == "path",
            "description": p.description,
            "schema": _param_schema(p),
        }
        for p in route.params
        if p.where != "body"
    ]
    if params:
        op["parameters"] = params
    body = [p for p in route.params if p.where == "body"]
    if body:
        schema = {
            "type": "object",
            "properties": {
                p.name: {**_param_schema(p), "description": p.description} for p in body
            },
            "additionalProperties": False,
        }
        required = [p.name for p in body if p.required]
        if required:
            schema["required"] = required
        op["requestBody"] = {
            "required": bool(required),
            "content": {"application/json": {"schema": schema}},
        }
    ok: dict[str, Any] = {
        "description": "the answer, as the CLI's --output json prints it",
        "content": {"application/json": {"schema": _ref(route.response)}},
    }
    if route.streaming:
        ok["description"] = "the run as it started; it goes on at the relay"
        ok["headers"] = {"Location": {"description": "the run's URL", "schema": {"type": "string"}}}
    op["responses"] = {
        str(route.status): ok,
        "default": {
            "description": "an error: detail is the relay's sentence",
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        },
    }
    return op


def build_document() -> dict[str, Any]:
    """The document, from the route table and the schemas above."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(API_PREFIX + route.path, {})[route.method.lower()] = _operation(route)
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "the OpenAPI 3.1 document of /api/v1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aegis-edge relay API",
            "version": "1",
            "description": "The relay's Admin API as JSON. Send an operator token as "
            "'Authorization: Bearer <token>'; its role and tenants bound what a call may see "
            "and change, exactly as over gRPC. Errors are application/problem+json.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"operatorToken": []}],
    }


def render(document: dict[str, Any]) -> str:
    """The committed file's text: stable key order, one trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def committed_document() -> bytes:
    """``openapi.json`` as kept in the package."""
    return resources.files("aegis_edge_relay.http").joinpath("openapi.json").read_bytes()
