"""Host paging for ``GET /api/v1/hosts`` and the console: hosts come sorted by (tenant, node
id), and a page's cursor is the last one shown (opaque to the client)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.http import representation as rep
from aegis_edge_relay.http.params import BadRequest

__all__ = ["DEFAULT_HOST_PAGE", "MAX_HOST_PAGE", "host_page", "list_hosts_request"]

DEFAULT_HOST_PAGE: Final = 100
MAX_HOST_PAGE: Final = 1000


def _cursor(host: admin_pb2.Host) -> str:
    raw = json.dumps([host.tenant_id, host.node_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(text: str) -> tuple[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        value = None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(s, str) for s in value)):
        raise BadRequest(
            f"query parameter 'after' is not a cursor this API gave ({text!r}); "
            "pass the next_cursor of the previous page"
        )
    return value[0], value[1]


def list_hosts_request(v: dict[str, Any]) -> admin_pb2.ListHostsRequest:
    after_tenant, after_node = _after(v["after"]) if "after" in v else ("", "")
    return admin_pb2.ListHostsRequest(
        selector=v.get("selector", ""),
        connected_only=v.get("connected", False),
        tenant_id=v.get("tenant", ""),
        limit=v.get("limit", DEFAULT_HOST_PAGE),
        after_tenant_id=after_tenant,
        after_node_id=after_node,
    )


def host_page(msg: admin_pb2.ListHostsResponse, _v: dict[str, Any]) -> dict[str, Any]:
    return {
        "hosts": [rep.host(h) for h in msg.hosts],
        "next_cursor": _cursor(msg.hosts[-1]) if msg.more and msg.hosts else None,
        "matched": msg.matched,
        "status_counts": dict(sorted(msg.status_counts.items())),
    }
