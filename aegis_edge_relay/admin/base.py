"""What every area of the Admin servicer shares: its parts, the caller, a daemon's view."""

from __future__ import annotations

import grpc

from aegis_edge_core.authz import Principal
from aegis_edge_core.fleet.wire_values import PROTO_STATUS
from aegis_edge_core.wire import admin_pb2, admin_pb2_grpc
from aegis_edge_relay.admin.auth import Context, abort, authenticate
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService
from aegis_edge_relay.runs import FleetRuns
from aegis_edge_relay.state import NodeState, capabilities_to_proto
from aegis_edge_relay.store import StoreWorker

__all__ = ["AdminBase"]


class AdminBase(admin_pb2_grpc.AdminServicer):
    """The Admin servicer's parts; each area (hosts, tenants, groups, fleet) adds its RPCs."""

    def __init__(
        self, *, fleet: FleetView, identity: IdentityService, runs: FleetRuns, db: StoreWorker
    ) -> None:
        self.fleet = fleet
        self.identity = identity
        self.runs = runs
        self.db = db
        self.store = db.store
        self.now = fleet.now

    async def _auth(self, context: Context, rpc: str) -> Principal:
        identity = self.identity
        return await authenticate(
            context,
            rpc,
            verifier=identity.verifier,
            revocations=identity.revocations,
            now=self.now(),
        )

    async def _node(self, context: Context, principal: Principal, node_id: str) -> NodeState:
        node = self.fleet.nodes.get(node_id)
        if node is None or not principal.sees(node.tenant_id):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"daemon {node_id!r} not found")
        return node

    def _host(self, node: NodeState) -> admin_pb2.Host:
        fleet = self.fleet
        status = fleet.status_of(node.node_id)
        health = fleet.health.get(node.node_id)
        return admin_pb2.Host(
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            status=PROTO_STATUS[status],
            last_heartbeat_at=(health.last_heartbeat_at or 0.0) if health else 0.0,
            enrolled_at=node.enrolled_at,
            connected_since=fleet.connected_since.get(node.node_id, 0.0),
            capabilities=capabilities_to_proto(node.capabilities, node.tags),
            key_thumbprint=node.key_thumbprint,
            revoked_reason=node.revoked_reason,
        )
