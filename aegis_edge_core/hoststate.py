"""The pure parts of a daemon's state directory: file names, modes and file formats.

The state directory (default ``~/.aegis/edge``, mode 0700) holds everything a host knows
about its enrollment::

    node.key            Ed25519 PKCS#8 PEM, 0600 -- the node's identity
    node.key.next       a new key staged during a rotation (see below), 0600
    node.token          the current NodeSecurityToken (a JWT), 0600
    ca.pem              the relay's CA certificate, pinned at enrollment
    aegis-config.yaml   the host owner's config: relay endpoint, allowed tools, labels
    node.json           node id, tenant id, relay endpoint(s), key thumbprint (see NodeInfo)
    status.json         what the running daemon last recorded (see DaemonStatus)
    results.spool       results finished but not yet acknowledged by the relay
    children.pids       process groups of running tool calls, for orphan clean-up
    revoked.json        written when the relay told the daemon this node is revoked

A revoked node's key and token are worth nothing any more, so ``aegis edge enroll`` replaces
an enrollment that ``revoked.json`` marks without asking for ``--force``
(:func:`enrollment_to_protect`): the seed's tenant migration is "revoke, issue a token in the
new tenant, ``aegis edge enroll <new-token>``", typed as written.

A key rotation cannot swap two files in one step, so it stages the new key as
``node.key.next`` *before* asking the relay, then writes the new ``node.token`` and finally
renames ``node.key.next`` over ``node.key``. A crash in between is repaired at the next
start: if the token's ``cnf.jkt`` names the staged key, the rename is completed
(:func:`rotation_recovery`); otherwise the staged key is discarded.

This module never opens those files: it names them, says which modes they need, and
encodes/decodes their contents. Every decoder takes the ``source`` path the caller read
and raises :class:`HostStateError` naming it, so a damaged file is reported as that file.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
from google.protobuf.message import DecodeError

from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity.endpoints import endpoint_list
from aegis_edge_core.wire import stream_pb2

__all__ = [
    "CA_PEM",
    "CHILD_PIDS",
    "CONFIG_FILE",
    "DEFAULT_STATE_DIR",
    "DIR_MODE",
    "ENROLLMENT_FILES",
    "LOGS_DIR",
    "NODE_JSON",
    "NODE_KEY",
    "NODE_KEY_NEXT",
    "NODE_TOKEN",
    "PUBLIC_MODE",
    "REQUIRED_MODES",
    "RESULT_SPOOL",
    "REVOKED_JSON",
    "SECRET_MODE",
    "STATUS_JSON",
    "ChildProcess",
    "ConnectionState",
    "DaemonStatus",
    "HostStateError",
    "NodeInfo",
    "decode_child_pids",
    "decode_result_spool",
    "encode_child_pids",
    "encode_result_spool",
    "encode_revoked",
    "enrollment_to_protect",
    "mode_problem",
    "parse_node_json",
    "parse_status_json",
    "rotation_recovery",
]

DEFAULT_STATE_DIR: Final = "~/.aegis/edge"

NODE_KEY: Final = "node.key"
NODE_TOKEN: Final = "node.token"  # noqa: S105 - a file name
NODE_KEY_NEXT: Final = "node.key.next"
CA_PEM: Final = "ca.pem"
CONFIG_FILE: Final = "aegis-config.yaml"
NODE_JSON: Final = "node.json"
STATUS_JSON: Final = "status.json"
RESULT_SPOOL: Final = "results.spool"
CHILD_PIDS: Final = "children.pids"
LOGS_DIR: Final = "logs"
REVOKED_JSON: Final = "revoked.json"

DIR_MODE: Final = 0o700
SECRET_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644

ENROLLMENT_FILES: Final[tuple[str, ...]] = (NODE_KEY, NODE_TOKEN, NODE_JSON)
"""The files whose presence means "this host is enrolled" (enroll refuses to clobber them)."""

REQUIRED_MODES: Final[Mapping[str, int]] = {
    NODE_KEY: SECRET_MODE,
    NODE_KEY_NEXT: SECRET_MODE,
    NODE_TOKEN: SECRET_MODE,
    CA_PEM: PUBLIC_MODE,
    CONFIG_FILE: SECRET_MODE,
    # Not secrets, but they name the relay, tenant and node and say what the daemon is
    # doing: nobody but the owner needs them, so they are private like the keys.
    NODE_JSON: SECRET_MODE,
    STATUS_JSON: SECRET_MODE,
    RESULT_SPOOL: SECRET_MODE,
    CHILD_PIDS: SECRET_MODE,
    REVOKED_JSON: PUBLIC_MODE,
}
"""The mode each file is written with. Secrets (and files that may hold them) are 0600."""


def enrollment_to_protect(present: Iterable[str]) -> list[str]:
    """Which of the ``present`` state-dir files make an enrollment worth refusing to replace.

    None after ``aegis edge logout`` (no key, no token: nothing left to protect), and none
    once the relay has told this host it is revoked (:data:`REVOKED_JSON`).
    """
    names = set(present)
    if REVOKED_JSON in names or not names & {NODE_KEY, NODE_TOKEN}:
        return []
    return [n for n in ENROLLMENT_FILES if n in names]


def encode_revoked(*, node_id: str, revoked_at: float, message: str) -> str:
    """The contents of :data:`REVOKED_JSON`: which node, when the relay said so, and how."""
    return json.dumps(
        {"node_id": node_id, "revoked_at": revoked_at, "message": message}, sort_keys=True
    )


class HostStateError(AegisError):
    """A state-directory file is missing, damaged or unsafe; ``source`` names the file."""

    def __init__(self, message: str, *, source: str, hint: str = "") -> None:
        super().__init__(f"{source}: {message}", hint=hint)
        self.source = source


def mode_problem(name: str, mode: int, *, is_dir: bool = False) -> str | None:
    """Describe what is wrong with a file's permission bits, or None if they are safe.

    Secret files must not be readable or writable by group or others; the directory must
    be private to its owner (0700, no group/other bits).
    """
    perm = mode & 0o777
    if is_dir:
        if perm & 0o077:
            return f"{name} has mode {perm:04o}; it must be {DIR_MODE:04o} (chmod 700 {name})"
        return None
    required = REQUIRED_MODES.get(name)
    if required == SECRET_MODE and perm & 0o077:
        return f"{name} has mode {perm:04o}; it must be {SECRET_MODE:04o} (chmod 600 {name})"
    return None


def _load_json_object(text: str | bytes, *, source: str, hint: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise HostStateError(f"not valid JSON ({err})", source=source, hint=hint) from None
    if not isinstance(value, dict):
        raise HostStateError("must hold a JSON object", source=source, hint=hint)
    return value


def _str_field(data: Mapping[str, Any], key: str, *, source: str, hint: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise HostStateError(f"field {key!r} is missing or not a string", source=source, hint=hint)
    return value


def _opt_float(data: Mapping[str, Any], key: str, *, source: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HostStateError(f"field {key!r} must be a number", source=source)
    return float(value)


def _opt_str(data: Mapping[str, Any], key: str, *, source: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HostStateError(f"field {key!r} must be a string", source=source)
    return value


# --------------------------------------------------------------------------- node.json

_REENROLL = "re-enroll this host (aegis edge enroll <token> --force)"


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class NodeInfo:
    """What enrollment learned: written once to ``node.json``, read at every start."""

    node_id: str
    tenant_id: str
    relay: str
    """``host:port`` of the relay's daemon endpoint."""
    key_thumbprint: str
    enrolled_at: float
    ca_sha256: str = ""
    """Hex SHA-256 of the pinned CA certificate (DER), as the enrollment token carried it."""
    relays: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    """Every relay endpoint of the cluster (the token's ``rels``), to dial when ``relay``
    is gone; empty for a single relay or one balanced name. Absent in older node.json."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """What the daemon may dial: ``relay`` first, then the cluster's others."""
        return endpoint_list(self.relay, self.relays)

    def to_json(self) -> str:
        data = attrs.asdict(self)
        if not self.relays:
            del data["relays"]  # a single relay's node.json stays as it was
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def with_thumbprint(self, thumbprint: str) -> NodeInfo:
        return attrs.evolve(self, key_thumbprint=thumbprint)


def parse_node_json(text: str | bytes, *, source: str) -> NodeInfo:
    data = _load_json_object(text, source=source, hint=_REENROLL)
    fields = {
        key: _str_field(data, key, source=source, hint=_REENROLL)
        for key in ("node_id", "tenant_id", "relay", "key_thumbprint")
    }
    enrolled_at = _opt_float(data, "enrolled_at", source=source) or 0.0
    ca = _opt_str(data, "ca_sha256", source=source) or ""
    relays = data.get("relays", [])
    if not isinstance(relays, list) or not all(isinstance(r, str) and r for r in relays):
        raise HostStateError(
            "field 'relays' must be a list of host:port", source=source, hint=_REENROLL
        )
    return NodeInfo(enrolled_at=enrolled_at, ca_sha256=ca, relays=tuple(relays), **fields)


# --------------------------------------------------------------------------- status.json


class ConnectionState(enum.Enum):
    """The daemon's own view of its link to the relay (not the relay's health status)."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    REVOKED = "revoked"
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class DaemonStatus:
    """The ``status.json`` a running daemon rewrites on every state change and heartbeat ack.

    ``aegis edge status`` shows it, together with whether ``pid`` is still alive: a file
    saying ``connected`` from a dead process means the daemon crashed.
    """

    state: ConnectionState
    pid: int
    relay: str
    updated_at: float
    node_id: str = ""
    tenant_id: str = ""
    connected_since: float | None = None
    last_heartbeat_acked_at: float | None = None
    heartbeat_interval_secs: float | None = None
    token_expires_at: float | None = None
    next_retry_at: float | None = None
    inflight: int = 0
    pending_results: int = 0
    last_error: str = ""
    agent_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["state"] = self.state.value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def parse_status_json(text: str | bytes, *, source: str) -> DaemonStatus:
    hint = "the daemon rewrites it; delete it if the daemon is not running"
    data = _load_json_object(text, source=source, hint=hint)
    raw_state = data.get("state")
    try:
        state = ConnectionState(raw_state)
    except ValueError:
        raise HostStateError(f"unknown state {raw_state!r}", source=source, hint=hint) from None
    pid = data.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise HostStateError("field 'pid' must be an integer", source=source, hint=hint)
    inflight = data.get("inflight", 0)
    pending = data.get("pending_results", 0)
    if not isinstance(inflight, int) or not isinstance(pending, int):
        raise HostStateError("counters must be integers", source=source, hint=hint)
    return DaemonStatus(
        state=state,
        pid=pid,
        relay=_opt_str(data, "relay", source=source) or "",
        updated_at=_opt_float(data, "updated_at", source=source) or 0.0,
        node_id=_opt_str(data, "node_id", source=source) or "",
        tenant_id=_opt_str(data, "tenant_id", source=source) or "",
        connected_since=_opt_float(data, "connected_since", source=source),
        last_heartbeat_acked_at=_opt_float(data, "last_heartbeat_acked_at", source=source),
        heartbeat_interval_secs=_opt_float(data, "heartbeat_interval_secs", source=source),
        token_expires_at=_opt_float(data, "token_expires_at", source=source),
        next_retry_at=_opt_float(data, "next_retry_at", source=source),
        inflight=inflight,
        pending_results=pending,
        last_error=_opt_str(data, "last_error", source=source) or "",
        agent_version=_opt_str(data, "agent_version", source=source) or "",
    )


# --------------------------------------------------------------------------- results.spool


def encode_result_spool(results: Iterable[stream_pb2.CommandResult]) -> str:
    """One JSON line per unacknowledged result: ``{"command_id", "result_b64"}``."""
    lines = []
    for result in results:
        blob = base64.b64encode(result.SerializeToString()).decode("ascii")
        lines.append(json.dumps({"command_id": result.command_id, "result_b64": blob}))
    return "".join(line + "\n" for line in lines)


def decode_result_spool(
    text: str, *, source: str
) -> tuple[list[stream_pb2.CommandResult], list[str]]:
    """Results in the spool, and a description of every line that could not be read.

    A damaged line (a crash mid-write can only leave the last one damaged, since the file is
    replaced atomically, but a disk can do worse) is skipped and reported, never fatal: one
    bad record must not cost the others.
    """
    results: list[stream_pb2.CommandResult] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            blob = base64.b64decode(record["result_b64"], validate=True)
            result = stream_pb2.CommandResult()
            result.ParseFromString(blob)
        except (ValueError, KeyError, TypeError, binascii.Error, DecodeError) as err:
            problems.append(f"{source}:{number}: unreadable record ({type(err).__name__})")
            continue
        if not result.command_id:
            problems.append(f"{source}:{number}: record without a command id")
            continue
        results.append(result)
    return results, problems


# --------------------------------------------------------------------------- children.pids


@attrs.frozen(kw_only=True)
class ChildProcess:
    """A tool call's process group, recorded so a crashed daemon's children can be killed."""

    pgid: int
    command_id: str
    started_at: float
    daemon_pid: int


def encode_child_pids(children: Iterable[ChildProcess]) -> str:
    return "".join(json.dumps(attrs.asdict(c), sort_keys=True) + "\n" for c in children)


def decode_child_pids(text: str, *, source: str) -> list[ChildProcess]:
    """Records in the pid spool; damaged lines are skipped (clean-up is best effort)."""
    out: list[ChildProcess] = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            child = ChildProcess(
                pgid=int(rec["pgid"]),
                command_id=str(rec["command_id"]),
                started_at=float(rec["started_at"]),
                daemon_pid=int(rec["daemon_pid"]),
            )
        except (ValueError, KeyError, TypeError):
            continue
        if child.pgid > 1:
            out.append(child)
    return out


# --------------------------------------------------------------------------- rotation


def rotation_recovery(
    *, token_thumbprint: str | None, current_thumbprint: str | None, staged_thumbprint: str
) -> str:
    """What to do with a staged ``node.key.next`` found at start.

    Answers ``"promote"`` (the token is bound to the staged key: the relay accepted the
    rotation, finish the rename) or ``"discard"`` (the rotation never completed, or the
    current key already is the staged one).
    """
    if token_thumbprint == staged_thumbprint and current_thumbprint != staged_thumbprint:
        return "promote"
    return "discard"
