"""``AdminClient``: the relay's Admin API from Python, for automation and for the CLI.

One method per Admin RPC, taking plain arguments (or a ``FleetRunSpec``) and answering the
relay's messages; the streaming RPCs answer iterators of ``FleetRunEvent``. A refused or
failed call raises :class:`AdminError`, whose message is the relay's own sentence and whose
subclasses are the cases a caller branches on (:class:`AdminNotFound`,
:class:`AdminPermissionDenied`, :class:`AdminUnavailable`, ...)::

    from aegis_edge_relay.operator.client import AdminClient, AdminNotFound

    with AdminClient() as admin:  # AEGIS_RELAY, AEGIS_CA_CERT, AEGIS_OPERATOR_TOKEN
        for host in admin.list_hosts(connected_only=True):
            print(host.node_id, host.capabilities.hostname)
        try:
            admin.get_host("n-404")
        except AdminNotFound as err:
            print(err)  # the relay's sentence

    local = Connection.resolve(data_dir="./relay")  # relay.json, ca.pem, operator.token
    remote = Connection.resolve("relay.example.com:443", ca_cert="ca.pem", token="@op.token")

:meth:`Connection.resolve` finds the relay like every ``aegis edge`` operator command:
arguments first, then the environment, then a local relay's data directory. The client
speaks TLS with the relay's CA as its only root (or plaintext for a relay started with
``--insecure``) and sends the operator token as ``authorization: Bearer <token>`` metadata.

grpc is imported when a client is made, not with this module, so the ``aegis`` command
starts without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aegis_edge_core.wire import admin_pb2
from aegis_edge_relay.operator.connection import (
    ENV_CA_CERT,
    ENV_RELAY,
    ENV_RELAY_DATA_DIR,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    Connection,
)
from aegis_edge_relay.operator.errors import (
    AdminAlreadyExists,
    AdminError,
    AdminFailedPrecondition,
    AdminInvalidArgument,
    AdminNotFound,
    AdminPermissionDenied,
    AdminSettingsError,
    AdminUnauthenticated,
    AdminUnavailable,
    error_class,
)

if TYPE_CHECKING:
    import grpc

    from aegis_edge_core.wire.admin_pb2_grpc import AdminStub

__all__ = [
    "ENV_CA_CERT",
    "ENV_RELAY",
    "ENV_RELAY_DATA_DIR",
    "ENV_TLS_SERVER_NAME",
    "ENV_TOKEN",
    "UNARY_TIMEOUT_SECS",
    "AdminAlreadyExists",
    "AdminClient",
    "AdminError",
    "AdminFailedPrecondition",
    "AdminInvalidArgument",
    "AdminNotFound",
    "AdminPermissionDenied",
    "AdminSettingsError",
    "AdminUnauthenticated",
    "AdminUnavailable",
    "Connection",
    "Events",
    "rpc_error_message",
]

UNARY_TIMEOUT_SECS: Final = 30.0
"""How long a unary admin call may take before the client gives up (streams: no bound)."""


def rpc_error_message(err: grpc.RpcError, relay: str) -> str:
    """One line for a failed call, for people: the relay's sentence, no status-code name.

    The relay's details already say what to do where it knows (a refused token says how
    to get a good one), so nothing is added to them except where the relay could not
    answer at all.
    """
    import grpc

    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err) or ""
    details = " ".join(details.split())
    if code is grpc.StatusCode.UNAVAILABLE:
        hint = "is `aegis relay serve` running?"
        lowered = details.lower()
        if any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")):
            hint = f"check --ca-cert / {ENV_CA_CERT} and that it is the relay's CA"
        return f"cannot reach the relay at {relay}: {details or 'no answer'}; {hint}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the relay at {relay} did not answer in time" + (f" ({details})" if details else "")
    if details:
        return details
    what = code.name.lower().replace("_", " ") if code is not None else "an unknown error"
    return f"the relay answered {what} without details"


def _admin_error(err: grpc.RpcError, relay: str) -> AdminError:
    import grpc

    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or ""
    return error_class(code)(rpc_error_message(err, relay), code=code, details=details)


_Reply = TypeVar("_Reply")
Events = Iterator[admin_pb2.FleetRunEvent]
"""A run's event stream: ``started``, then ``dispatched`` / ``target_finished`` (and
``output`` when asked for) per target -- or several targets per ``targets_dispatched`` /
``targets_finished`` (``batch_events``), or ``progress`` counts (``summary_only``) -- last
``finished`` with the final record."""


class AdminClient:
    """A blocking client of one relay's Admin service; close it (or use ``with``).

    Unary calls give up after ``timeout`` seconds; event streams run as long as the run.
    Every call raises :class:`AdminError` (a subclass where one fits) on failure; a
    streaming call is made when its iterator is first advanced, so its refusal comes then.
    """

    def __init__(
        self, connection: Connection | None = None, *, timeout: float = UNARY_TIMEOUT_SECS
    ) -> None:
        """Nothing is sent until the first call. ``connection`` None: the environment's
        (``AEGIS_RELAY``, ``AEGIS_CA_CERT``, ``AEGIS_OPERATOR_TOKEN``, or
        ``AEGIS_RELAY_DATA_DIR``); raises :class:`AdminSettingsError` if it is not enough."""
        if connection is None:
            connection = Connection.resolve()
        # gRPC's C core reads its log level when grpc is first imported and would print a
        # failed TLS handshake on stderr at INFO, above our one-line error. Errors only,
        # unless the caller set GRPC_VERBOSITY. (Only effective if nothing imported grpc.)
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        import grpc

        from aegis_edge_core.wire import admin_pb2_grpc

        self.connection = connection
        self.timeout = timeout
        if connection.insecure:
            self._channel = grpc.insecure_channel(connection.relay)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=connection.ca_pem)
            name = connection.server_name
            options = [("grpc.ssl_target_name_override", name)] if name else []
            self._channel = grpc.secure_channel(connection.relay, creds, options=options)
        self._stub: AdminStub = admin_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdminClient(relay={self.connection.relay!r})"

    def _unary(self, call: Callable[..., _Reply], request: Any) -> _Reply:
        import grpc

        try:
            return call(request, metadata=self.connection.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise _admin_error(err, self.connection.relay) from None

    def _stream(self, call: Callable[..., Any], request: Any) -> Events:
        import grpc

        try:
            events = call(request, metadata=self.connection.metadata)
            try:
                yield from events
            finally:
                events.cancel()  # a caller that stops early ends the call at the relay too
        except grpc.RpcError as err:
            raise _admin_error(err, self.connection.relay) from None

    # -- hosts ----------------------------------------------------------------------------

    def list_hosts(
        self, *, connected_only: bool = False, tenant_id: str = "", selector: str = ""
    ) -> list[admin_pb2.Host]:
        """Hosts the token may see: only Connected ones, one tenant's, or those a fleet
        selector (``tags=prod os=linux``) matches. No command history."""
        request = admin_pb2.ListHostsRequest(
            connected_only=connected_only, tenant_id=tenant_id, selector=selector
        )
        return list(self._unary(self._stub.ListHosts, request).hosts)

    def get_host(self, node_id: str, *, history_limit: int = 0) -> admin_pb2.Host:
        """One host with its recent tool calls, newest first (0: the relay's default)."""
        request = admin_pb2.GetHostRequest(node_id=node_id, history_limit=history_limit)
        return self._unary(self._stub.GetHost, request)

    def add_tags(self, node_id: str, tags: Iterable[str]) -> admin_pb2.Host:
        """Add operator tags to a host; answers the host as it is now."""
        request = admin_pb2.TagsRequest(node_id=node_id, tags=list(tags))
        return self._unary(self._stub.AddTags, request)

    def remove_tags(self, node_id: str, tags: Iterable[str]) -> admin_pb2.Host:
        """Remove operator tags from a host; answers the host as it is now."""
        request = admin_pb2.TagsRequest(node_id=node_id, tags=list(tags))
        return self._unary(self._stub.RemoveTags, request)

    def revoke_node(self, node_id: str, *, reason: str = "") -> admin_pb2.Host:
        """Revoke a daemon: status Revoked, token and key blacklisted, stream dropped."""
        request = admin_pb2.RevokeNodeRequest(node_id=node_id, reason=reason)
        return self._unary(self._stub.RevokeNode, request)

    # -- tenants and enrollment -----------------------------------------------------------

    def issue_enrollment_token(
        self, tenant_id: str, *, ttl_secs: float = 0.0
    ) -> admin_pb2.IssueEnrollmentTokenResponse:
        """A single-use enrollment token for ``tenant_id`` (0: the relay's default 15 min)."""
        request = admin_pb2.IssueEnrollmentTokenRequest(tenant_id=tenant_id, ttl_secs=ttl_secs)
        return self._unary(self._stub.IssueEnrollmentToken, request)

    def delete_tenant(self, tenant_id: str) -> admin_pb2.DeleteTenantResponse:
        """Delete a tenant and revoke every daemon bound to it, in one transaction."""
        request = admin_pb2.DeleteTenantRequest(tenant_id=tenant_id)
        return self._unary(self._stub.DeleteTenant, request)

    # -- fleet runs -----------------------------------------------------------------------

    def preview_fleet_run(self, spec: admin_pb2.FleetRunSpec) -> admin_pb2.FleetPreview:
        """The dry run of ``spec``: which daemons would be targets, which skipped and why."""
        return self._unary(self._stub.PreviewFleetRun, spec)

    def start_fleet_run(self, spec: admin_pb2.FleetRunSpec) -> Events:
        """Start a run and follow it to its end (``spec.follow_output``: live output too).

        The run goes on at the relay if the iteration stops early; ``watch_fleet_run``
        follows it again and ``cancel_fleet_run`` stops it.
        """
        return self._stream(self._stub.StartFleetRun, spec)

    def watch_fleet_run(
        self,
        fleet_command_id: str,
        *,
        follow_output: bool = False,
        batch_events: bool = False,
        summary_only: bool = False,
    ) -> Events:
        """Follow a run to its end; a finished one answers ``started`` and ``finished``.
        ``batch_events``/``summary_only``: as ``FleetRunSpec``'s."""
        request = admin_pb2.GetFleetRunRequest(
            fleet_command_id=fleet_command_id,
            follow_output=follow_output,
            batch_events=batch_events,
            summary_only=summary_only,
        )
        return self._stream(self._stub.WatchFleetRun, request)

    def rerun_fleet_run(
        self,
        fleet_command_id: str,
        *,
        only: str = "all",
        secret_args: Mapping[str, str] | None = None,
        follow_output: bool = False,
        batch_events: bool = False,
        summary_only: bool = False,
    ) -> Events:
        """Run a finished run's spec again on ``all``, the ``failed`` or the
        ``not_started`` targets of it. Its secret arguments are not stored: give every
        one again in ``secret_args``. Streams like :meth:`start_fleet_run`."""
        request = admin_pb2.RerunFleetRunRequest(
            fleet_command_id=fleet_command_id,
            only=only,
            secret_args_json=json.dumps(dict(secret_args), sort_keys=True) if secret_args else "",
            follow_output=follow_output,
            batch_events=batch_events,
            summary_only=summary_only,
        )
        return self._stream(self._stub.RerunFleetRun, request)

    def list_fleet_runs(self, *, limit: int = 0, tenant_id: str = "") -> list[admin_pb2.FleetRun]:
        """Recent runs, newest first, without per-target rows (``targets_omitted``; the
        ``counts`` say how each went). ``limit`` 0: the relay's default."""
        request = admin_pb2.ListFleetRunsRequest(limit=limit, tenant_id=tenant_id)
        return list(self._unary(self._stub.ListFleetRuns, request).runs)

    def get_fleet_run(self, fleet_command_id: str) -> admin_pb2.FleetRun:
        """One run with every target."""
        request = admin_pb2.GetFleetRunRequest(fleet_command_id=fleet_command_id)
        return self._unary(self._stub.GetFleetRun, request)

    def cancel_fleet_run(self, fleet_command_id: str) -> admin_pb2.FleetRun:
        """Cancel a running run: nothing new is dispatched, in-flight calls are cancelled.
        A finished run is refused (:class:`AdminFailedPrecondition`)."""
        request = admin_pb2.GetFleetRunRequest(fleet_command_id=fleet_command_id)
        return self._unary(self._stub.CancelFleetRun, request)

    # -- saved groups ---------------------------------------------------------------------

    def create_group(
        self, name: str, *, selector: str, tenant_id: str = "", pinned: Iterable[str] = ()
    ) -> admin_pb2.Group:
        """Save a group (``group=NAME`` in selectors): a selector plus pinned node ids.
        ``tenant_id`` empty: the token's, when it is scoped to exactly one."""
        request = admin_pb2.CreateGroupRequest(
            name=name, tenant_id=tenant_id, selector=selector, pinned=list(pinned)
        )
        return self._unary(self._stub.CreateGroup, request)

    def list_groups(self, *, tenant_id: str = "") -> list[admin_pb2.Group]:
        """Saved groups by tenant, then name; without members."""
        request = admin_pb2.ListGroupsRequest(tenant_id=tenant_id)
        return list(self._unary(self._stub.ListGroups, request).groups)

    def get_group(self, name: str, *, tenant_id: str = "") -> admin_pb2.Group:
        """One group with its members now and its pinned nodes that are not enrolled."""
        request = admin_pb2.GetGroupRequest(name=name, tenant_id=tenant_id)
        return self._unary(self._stub.GetGroup, request)

    def delete_group(self, name: str, *, tenant_id: str = "") -> admin_pb2.Group:
        """Delete a group; answers it as it was. Runs already started are not affected."""
        request = admin_pb2.GetGroupRequest(name=name, tenant_id=tenant_id)
        return self._unary(self._stub.DeleteGroup, request)
