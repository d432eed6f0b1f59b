"""The ``Admin`` gRPC servicer, one module per area.

:mod:`.auth` is the gate every call passes (operator token, role, the core's errors as
statuses); :mod:`.base` holds the parts the areas share; :mod:`.hosts`, :mod:`.tenants`,
:mod:`.groups` and :mod:`.fleet` add their RPCs. :class:`AdminService` is all of them.
"""

from __future__ import annotations

from aegis_edge_relay.admin.fleet import FleetAdmin
from aegis_edge_relay.admin.hosts import HostsAdmin
from aegis_edge_relay.admin.tenants import TenantsAdmin

__all__ = ["AdminService"]


class AdminService(HostsAdmin, TenantsAdmin, FleetAdmin):
    """Every Admin RPC, over the fleet view, identity service, fleet runs and store."""
