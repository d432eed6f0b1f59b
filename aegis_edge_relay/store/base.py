"""What the relay needs from persistent storage: the :class:`Store` interface, the rows it
trades in, and its errors.

Everything the relay must remember across restarts lives behind :class:`Store`: enrolled
daemons (which outlive their streams), redeemed enrollment tokens, the revocation list,
command history, fleet runs and saved groups. An implementation makes each change that must
be atomic one transaction: redeeming an enrollment token *and* inserting the node; revoking
a node *and* listing its token and key; deleting a tenant *and* revoking all of its daemons;
swapping a rotated key *and* revoking the old token.

The methods are synchronous and need not be thread-safe: the relay calls them through
:class:`~aegis_edge_relay.store.worker.StoreWorker`, one dedicated thread, so the event loop
never blocks on the database and there is never a second writer. Heartbeats do not cost a
transaction each: the relay keeps ``last_heartbeat_at`` in memory and calls
:meth:`Store.flush_heartbeats` every few seconds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, Protocol

import attrs

from aegis_edge_core.cluster import Holder, RelayLease
from aegis_edge_core.errors import AegisError

__all__ = [
    "NODES_CHANGED",
    "ROUTED_OUTPUT_ROWS",
    "RUN_CANCELS",
    "CommandRow",
    "ConsoleSecret",
    "FleetRunRow",
    "GroupExists",
    "GroupRow",
    "Listener",
    "NodeFeed",
    "NodeRecord",
    "RoutedCommand",
    "RoutedOutput",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenAlreadyRedeemed",
    "answered_run",
    "cancel_answered",
    "relay_channel",
]


NODES_CHANGED: Final = "aegis_nodes"
"""The wake-up channel a shared store signals when a transaction revoked nodes (payload
``revoked``) or changed any row of the change feed (``changed``): the other relays read
the feed at once (and cut revoked nodes' streams) instead of at their next periodic sync."""


ROUTED_OUTPUT_ROWS: Final = 64
"""Output chunks of one routed command the store keeps waiting for its coordinator; a
coordinator that falls behind loses the oldest (and is told how many bytes)."""


RUN_CANCELS: Final = "aegis_run_cancels"
"""The wake-up channel a shared store signals (payload :func:`cancel_answered`) when a run's
cancel asked through a relay that does not coordinate the run is answered, or goes with the
run's lease as it ends: the asking relay returns at once instead of polling for the answer."""

_ANSWERED: Final = "answered:"


def cancel_answered(fleet_command_id: str) -> str:
    """The :data:`RUN_CANCELS` payload for a run whose cancel was answered."""
    return _ANSWERED + fleet_command_id


def answered_run(payload: str) -> str | None:
    """The run a :func:`cancel_answered` payload names; None for any other payload."""
    return payload.removeprefix(_ANSWERED) if payload.startswith(_ANSWERED) else None


def relay_channel(relay_id: str) -> str:
    """The wake-up channel of one relay: commands routed to it, results routed back."""
    return f"aegis_relay_{relay_id}"


class StoreError(AegisError):
    """A store operation was refused (unknown node, concurrent change...)."""


class StoreUnavailable(StoreError):
    """The database could not be read or written (locked, disk full, I/O error). Nothing
    was changed: the transaction was rolled back. Callers answer UNAVAILABLE."""


class TokenAlreadyRedeemed(StoreError):
    """The enrollment token's ``jti`` was redeemed before: tokens are single use."""


class GroupExists(StoreError):
    """The tenant already has a group of that name."""


@attrs.frozen(kw_only=True)
class NodeRecord:
    """One enrolled daemon as stored. ``revoked`` is the only status that is persisted;
    live statuses (Connected, Unhealthy, Disconnected) come from the health tracker."""

    node_id: str
    tenant_id: str
    public_key: bytes = attrs.field(repr=False)
    key_thumbprint: str
    enrolled_at: float
    revoked: bool = False
    revoked_reason: str = ""
    revoked_at: float = 0.0
    last_heartbeat_at: float | None = None
    capabilities: Mapping[str, Any] = attrs.field(factory=dict)
    tags: tuple[str, ...] = ()
    token_jti: str = ""
    token_expires_at: float = 0.0


@attrs.frozen(kw_only=True)
class CommandRow:
    command_id: str
    node_id: str
    tenant_id: str
    tool: str
    dispatched_at: float
    fleet_command_id: str = ""
    finished_at: float | None = None
    outcome: str = ""
    exit_code: int | None = None
    error: str = ""
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    result_json: str = ""
    """The tool's structured result as JSON (``sys.info``'s); empty when none."""


@attrs.frozen(kw_only=True)
class FleetRunRow:
    fleet_command_id: str
    tenant_id: str
    scope: tuple[str, ...] | None
    """Tenants the creating token could see (None: all); readers need to cover them."""
    spec: Mapping[str, Any]
    outcome: str
    created_at: float
    finished_at: float | None
    created_by: str
    record: Mapping[str, Any]
    trace_id: str = ""
    args_json: str | None = None
    """The tool's plain arguments (JSON object); ``None`` for a run stored before they were
    kept. Secret arguments are never here: only their names, in ``secret_keys``."""
    secret_keys: tuple[str, ...] = ()
    rerun_of: str = ""


@attrs.frozen(kw_only=True)
class RoutedCommand:
    """A command for a node whose stream another relay holds: queued for that relay (the
    holder), which delivers it once and marks it done; the coordinator (the relay that
    dispatched it and waits) then reads the result from ``commands``."""

    def dispatch_row(self) -> CommandRow:
        """Its ``commands`` row as dispatched."""
        return CommandRow(
            command_id=self.command_id,
            node_id=self.node_id,
            tenant_id=self.tenant_id,
            tool=self.tool,
            dispatched_at=self.created_at,
            fleet_command_id=self.fleet_command_id,
        )

    command_id: str
    node_id: str
    tenant_id: str
    holder: str
    coordinator: str
    tool: str
    args_json: str
    fleet_command_id: str = ""
    deadline: float = 0.0
    timeout_secs: float = 0.0
    created_at: float = 0.0
    cancel: str = ""
    """A cancel asked for by the coordinator (its reason); empty when none."""


@attrs.frozen(kw_only=True)
class RoutedOutput:
    """A chunk of a routed command's live output, on its way from the relay holding the
    node's stream to the command's coordinator. ``dropped_before``: bytes of this command's
    output lost just before this chunk (older chunks the store let go, see
    :data:`ROUTED_OUTPUT_ROWS`)."""

    command_id: str
    seq: int
    stdout: bytes = b""
    stderr: bytes = b""
    dropped_before: int = 0


@attrs.frozen(kw_only=True)
class NodeFeed:
    """One read of the cluster's change feed (``aegis_edge_core.cluster_feed``): the node
    and holder rows changed after the number asked for (every row: a full read), from one
    snapshot. Holder rows include released ones (``relay_id`` empty)."""

    nodes: tuple[NodeRecord, ...]
    holders: tuple[Holder, ...]
    seqs: tuple[int, ...]
    """The change numbers of the rows read (nodes' and holders')."""
    head: int
    """The sequence's last number drawn when read (committed or not)."""
    full: bool


@attrs.frozen(kw_only=True)
class ConsoleSecret:
    """A console session or one-time login link as stored: found by the SHA-256 of its
    secret, the operator token sealed under a key derived from that secret."""

    kind: str
    """``session`` or ``link``."""
    sealed: bytes = attrs.field(repr=False)
    expires_at: float


@attrs.frozen(kw_only=True)
class GroupRow:
    """A saved group as stored; the core's ``Group`` validates it when it is used."""

    tenant_id: str
    name: str
    selector: str
    pinned: tuple[str, ...] = ()
    created_at: float = 0.0
    created_by: str = ""


class Listener(Protocol):
    """Wake-ups from a shared store (PostgreSQL ``LISTEN``), on a connection of its own."""

    def wait(self, timeout: float) -> list[str]:
        """Block up to ``timeout`` seconds for notifications; their payloads (empty: none)."""
        ...

    def close(self) -> None: ...


class Store(Protocol):
    """What the relay needs from persistent storage. Methods are synchronous."""

    schema_migrated: tuple[int, int]
    """The schema version found at open and the one migrated to (equal: nothing to do)."""
    shared: bool
    """Whether several relays may share this store (a cluster): PostgreSQL yes, SQLite no."""

    def close(self) -> None: ...
    def unavailable(self, err: BaseException) -> StoreUnavailable | None:
        """``err`` from the store's driver as :class:`StoreUnavailable` (with a sentence
        naming the store, never its password), or ``None`` when it is no outage."""
        ...

    # nodes
    def load_nodes(self) -> list[NodeRecord]: ...
    def get_node(self, node_id: str) -> NodeRecord | None: ...
    def enroll(self, *, jti: str, token_expires_at: float, node: NodeRecord) -> None: ...
    def is_tenant_deleted(self, tenant_id: str) -> bool: ...
    def set_capabilities(self, node_id: str, capabilities: Mapping[str, Any]) -> None: ...
    def set_tags(self, node_id: str, tags: Sequence[str]) -> None: ...
    def set_token(self, node_id: str, jti: str, expires_at: float) -> None: ...
    def flush_heartbeats(self, beats: Mapping[str, float]) -> None: ...
    def revoke_node(
        self, node_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> NodeRecord: ...
    def delete_tenant(
        self, tenant_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> list[str]: ...
    def rotate_key(
        self,
        node_id: str,
        *,
        old_thumbprint: str,
        new_public_key: bytes,
        new_thumbprint: str,
        new_jti: str,
        new_expires_at: float,
        old_jti_prune_after: float,
        now: float,
    ) -> NodeRecord: ...

    # revocations
    def load_revocations(self) -> tuple[dict[str, float], set[str]]: ...
    def revoke_token(self, jti: str, *, prune_after: float, now: float) -> None: ...
    def prune_revocations(self, now: float) -> int: ...

    # cluster identity (a single relay is a cluster of one: the same rows, one of each)
    def publish_relay_key(self, kid: str, public_key: bytes, now: float) -> None:
        """Record a relay's token-signing public key under its ``kid`` (kept if present)."""
        ...

    def load_relay_keys(self) -> dict[str, bytes]:
        """Every published relay key: ``kid`` to raw Ed25519 public key."""
        ...

    def join_cluster(self, name: str, ca_cert: str, now: float) -> str:
        """Create cluster ``name`` with this CA certificate (PEM) unless it exists, in one
        transaction; return the cluster's CA certificate (the caller compares)."""
        ...

    def publish_endpoint(self, relay_id: str, cluster: str, endpoint: str, now: float) -> None:
        """Record (or update) the endpoint daemons should dial for relay ``relay_id``."""
        ...

    def cluster_endpoints(self, cluster: str) -> list[str]:
        """The endpoints the relays of ``cluster`` published, each once, in a stable order."""
        ...

    # commands
    def record_dispatch(self, row: CommandRow) -> None: ...
    def record_result(self, row: CommandRow) -> bool: ...
    def record_dispatches(self, rows: Sequence[CommandRow]) -> None: ...
    def record_results(self, rows: Sequence[CommandRow]) -> list[bool]: ...
    def command_history(self, node_id: str, limit: int) -> list[CommandRow]: ...
    def get_command(self, command_id: str) -> CommandRow | None: ...
    def finish_orphaned_commands(self, *, now: float, error: str) -> int: ...
    def fleet_run_commands(self, fleet_command_id: str) -> list[CommandRow]: ...

    # fleet runs
    def save_fleet_run(self, row: FleetRunRow) -> None: ...
    def get_fleet_run(self, fleet_command_id: str) -> FleetRunRow | None: ...
    def list_fleet_runs(self, limit: int) -> list[FleetRunRow]: ...
    def unfinished_fleet_runs(self) -> list[FleetRunRow]: ...

    # saved groups
    def create_group(self, row: GroupRow) -> None: ...
    def list_groups(self, tenants: Collection[str] | None) -> list[GroupRow]: ...
    def get_group(self, tenant_id: str, name: str) -> GroupRow | None: ...
    def delete_group(self, tenant_id: str, name: str) -> bool: ...

    # the cluster: relay leases and stream holders (``aegis_edge_core.cluster``'s rules)
    def renew_lease(self, lease: RelayLease) -> None: ...
    def load_leases(self) -> list[RelayLease]: ...
    def drop_lease(self, relay_id: str) -> int:
        """Remove the relay's lease and release every stream it holds, in one transaction
        (a relay stopping, or starting again with nothing held); the streams released."""
        ...

    def hold_stream(self, node_id: str, relay_id: str, status: str, now: float) -> int:
        """Record ``relay_id`` as the holder of the node's stream; the new generation."""
        ...

    def hold_streams(self, rows: Sequence[tuple[str, str, str, float]]) -> list[int]:
        """:meth:`hold_stream` for each (node_id, relay_id, status, now), in order, in one
        transaction; the new generations."""
        ...

    def release_stream(self, node_id: str, relay_id: str, generation: int) -> bool:
        """Clear the holder only if it is still (``relay_id``, ``generation``)."""
        ...

    def set_held_statuses(self, relay_id: str, statuses: Sequence[tuple[str, int, str]]) -> None:
        """(node_id, generation, status) of streams ``relay_id`` still holds."""
        ...

    def load_holders(self) -> list[Holder]: ...

    # commands routed through the store (delivered at most once: state queued -> sent)
    def route_commands(self, rows: Sequence[RoutedCommand]) -> None:
        """Record each command's dispatch in ``commands`` *and* queue it for its holder, in
        one transaction: a run's next coordinator never finds a dispatch it cannot tell
        the holder of."""
        ...

    def take_routed(self, holder: str) -> list[RoutedCommand]:
        """The commands queued for ``holder``, marked sent in the same statement."""
        ...

    def cancel_routed(self, command_id: str, reason: str) -> None: ...
    def take_cancels(self, holder: str) -> list[tuple[str, str]]:
        """(command_id, reason) of cancels for delivered commands not yet passed on."""
        ...

    def finish_routed(self, command_id: str) -> None: ...
    def take_routed_results(self, coordinator: str) -> list[str]:
        """Ids of routed commands of ``coordinator`` whose result is now in ``commands``."""
        ...

    # fleet runs' coordinator leases
    def lease_runs(self, coordinator: str, ids: Sequence[str], expires_at: float) -> None:
        """Create or renew the leases of the runs ``coordinator`` drives."""
        ...

    def load_run_leases(self) -> list[tuple[str, str, float]]:
        """(fleet_command_id, coordinator, expires_at) of every run lease."""
        ...

    def claim_run(
        self, fleet_command_id: str, coordinator: str, expected: str, expires_at: float
    ) -> dict[str, str] | None:
        """Take a run's lease over if its coordinator is still ``expected`` ('' for a run
        without one), and point its routed commands at the new coordinator, in one
        transaction. The routed commands (command_id -> holder), or None when another
        relay claimed it first."""
        ...

    def drop_run_lease(self, fleet_command_id: str, coordinator: str) -> None:
        """The run finished: its lease goes, and with it any cancel asked for through
        another relay (that relay reads the finished run instead)."""
        ...

    # live output of routed commands, on its way back to their coordinators
    def route_output(self, rows: Sequence[RoutedOutput]) -> None:
        """Append chunks and wake each command's coordinator. A command with more than
        :data:`ROUTED_OUTPUT_ROWS` waiting loses its oldest; their bytes are added to the
        ``dropped_before`` of the oldest one kept, so the drop is reported, never silent."""
        ...

    def take_routed_output(self, coordinator: str) -> list[RoutedOutput]:
        """The chunks waiting for ``coordinator``'s routed commands, removed, in order per
        command."""
        ...

    # cancels of fleet runs asked for through a relay that does not coordinate them
    def request_run_cancel(self, fleet_command_id: str, reason: str, now: float) -> None:
        """Record the cancel (a repeated one asks again) and wake the run's coordinator."""
        ...

    def take_run_cancels(self, coordinator: str) -> list[tuple[str, str]]:
        """(fleet_command_id, reason) of the cancels of runs ``coordinator`` holds the lease
        of and has not taken yet (a run taken over is cancelled again by its new
        coordinator); marked taken by it."""
        ...

    def answer_run_cancel(self, fleet_command_id: str, answer: bytes) -> None:
        """The run (a serialized ``FleetRun``) as its coordinator saw it on taking the cancel."""
        ...

    def run_cancel_answer(self, fleet_command_id: str) -> bytes | None: ...

    def listen(self, channels: Sequence[str]) -> Listener | None:
        """A listener for ``channels``; None where no other relay can signal (SQLite)."""
        ...

    # the change feed of node and holder rows (``aegis_edge_core.cluster_feed``)
    def node_feed(self, since: int | None) -> NodeFeed:
        """Node and holder rows changed after change number ``since`` (None: every row),
        read from one snapshot."""
        ...

    # console sessions and one-time login links, shared by every relay of the store
    def put_console_secret(self, secret_hash: str, secret: ConsoleSecret, now: float) -> None:
        """Store a session or link (and drop every expired one: no timer needed)."""
        ...

    def get_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        """The live session or link of that hash and kind (None: unknown or expired)."""
        ...

    def take_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        """Delete it and return it if it was live: a second take finds nothing (a link is
        used once, a logout ends a session everywhere)."""
        ...
