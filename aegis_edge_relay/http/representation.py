"""The JSON bodies of the API: exactly what the CLI's ``--output json`` prints.

Each function calls the operator side's :mod:`~aegis_edge_relay.operator.jsonrepr` (one
representation, not a second mapping), with the options the matching CLI command uses.
"""

from __future__ import annotations

from typing import Any

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.operator.jsonrepr import (
    fleet_preview_to_dict,
    fleet_run_to_dict,
    group_to_dict,
    host_to_dict,
    message_to_dict,
    target_result_to_dict,
    tenant_deleted_to_dict,
)

__all__ = [
    "enrollment_token",
    "fleet_preview",
    "fleet_run",
    "group",
    "group_detail",
    "host",
    "host_detail",
    "target",
    "tenant_deleted",
]


def host(msg: admin_pb2.Host) -> dict[str, Any]:
    """``aegis edge ls|tag|keys revoke-remote --output json`` (one host)."""
    return host_to_dict(msg)


def host_detail(msg: admin_pb2.Host) -> dict[str, Any]:
    """``aegis edge show --output json``: the host with its command history."""
    return host_to_dict(msg, with_history=True)


def fleet_run(msg: admin_pb2.FleetRun) -> dict[str, Any]:
    """``aegis edge fleet run|show|runs|cancel --output json``."""
    return fleet_run_to_dict(msg)


def target(msg: admin_pb2.TargetResult) -> dict[str, Any]:
    """One target of a run, as in ``fleet_run``'s ``targets``."""
    return target_result_to_dict(msg)


def fleet_preview(msg: admin_pb2.FleetPreview) -> dict[str, Any]:
    """``aegis edge fleet preview --output json``."""
    return fleet_preview_to_dict(msg)


def group(msg: admin_pb2.Group) -> dict[str, Any]:
    """``aegis edge groups ls|rm --output json`` (one group)."""
    return group_to_dict(msg)


def group_detail(msg: admin_pb2.Group) -> dict[str, Any]:
    """``aegis edge groups create|show --output json``: with the members now."""
    return group_to_dict(msg, with_members=True)


def tenant_deleted(tenant_id: str, msg: admin_pb2.DeleteTenantResponse) -> dict[str, Any]:
    """``aegis edge tenants delete --output json``."""
    return tenant_deleted_to_dict(tenant_id, msg)


def enrollment_token(msg: admin_pb2.IssueEnrollmentTokenResponse) -> dict[str, Any]:
    """``aegis edge tokens issue --output json``."""
    return message_to_dict(msg)
