"""The relay's gRPC server: built with the relay's channel options and store-error
interceptor, bound to ``--listen`` (TLS unless ``--insecure``), and serving the stream,
enrollment, Admin and health services of a wired relay.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from aegis_edge_core.wire import admin_pb2_grpc, enrollment_pb2_grpc, stream_pb2
from aegis_edge_relay.admin import AdminService
from aegis_edge_relay.enrollment import EnrollmentService
from aegis_edge_relay.startup import StoreErrorInterceptor, _grpc_options
from aegis_edge_relay.streams import StreamHandler
from aegis_edge_relay.tls import TlsMaterial

__all__ = ["SERVICES", "add_services", "bind", "grpc_server", "serving", "stream_handler"]

SERVICES: Final = (
    "aegis.edge.v1.EdgeStream",
    "aegis.edge.v1.Enrollment",
    "aegis.edge.v1.Admin",
)


def stream_handler(streams: StreamHandler) -> grpc.GenericRpcHandler[Any, Any]:
    """``aegis.edge.v1.EdgeStream/Connect`` with raw request bytes: every frame reaches the
    core session, so garbage becomes a counted protocol error closing that one stream
    instead of a deserialization failure inside gRPC."""
    handler = grpc.stream_stream_rpc_method_handler(
        streams.connect,
        request_deserializer=None,
        response_serializer=stream_pb2.RelayMessage.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("aegis.edge.v1.EdgeStream", {"Connect": handler})


def grpc_server(handshake_timeout: float) -> grpc.aio.Server:
    return grpc.aio.server(
        options=_grpc_options(handshake_timeout),
        maximum_concurrent_rpcs=None,
        interceptors=[StoreErrorInterceptor()],
    )


def bind(server: grpc.aio.Server, listen: str, tls: TlsMaterial | None) -> int:
    """Listen on ``listen``; the port bound, 0 if gRPC could not bind it."""
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
            return server.add_secure_port(listen, creds)
        return server.add_insecure_port(listen)
    except RuntimeError:
        return 0


def add_services(
    server: grpc.aio.Server,
    *,
    streams: StreamHandler,
    enrollment: EnrollmentService,
    admin: AdminService,
) -> AsyncHealthServicer:
    """Register the relay's services; returns the health servicer, not serving yet."""
    server.add_generic_rpc_handlers((stream_handler(streams),))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(enrollment, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


async def serving(health_servicer: AsyncHealthServicer) -> None:
    """Report every service (and the server as a whole, ``""``) SERVING."""
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
