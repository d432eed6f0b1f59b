"""The values the relay's parts share: a daemon's record in memory, an open stream.

A :class:`NodeState` per enrolled daemon (the fleet view's working copy of the store's row,
updated in the same step that writes the store) and a :class:`StreamHandle` per open
stream, with the capability conversions between the wire and the stored form. The
collections of them, and what happens to them, are :mod:`.fleetview`'s.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import grpc

from aegis_edge_core.fleet.snapshot import DaemonSnapshot
from aegis_edge_core.identity.attestation import NodeRecord as CoreNodeRecord
from aegis_edge_core.identity.rotation import TokenSuccession
from aegis_edge_core.session import RelaySession
from aegis_edge_core.wire import common_pb2, stream_pb2
from aegis_edge_relay.refusals import Metadata, refusal_status
from aegis_edge_relay.store import NodeRecord

__all__ = [
    "Clock",
    "CloseStream",
    "NodeState",
    "StreamHandle",
    "capabilities_from_proto",
    "capabilities_to_proto",
]

Clock = Callable[[], float]
"""Wall-clock seconds (``time.time``); the parts read time only through the one they get."""


def capabilities_from_proto(caps: common_pb2.Capabilities) -> dict[str, Any]:
    """The daemon-reported part of a capability snapshot (tags are relay-owned)."""
    return {
        "os": caps.os,
        "arch": caps.arch,
        "tools": sorted(set(caps.tools)),
        "labels": dict(sorted(caps.labels.items())),
        "hostname": caps.hostname,
        "agent_version": caps.agent_version,
    }


def capabilities_to_proto(
    caps: Mapping[str, Any], tags: frozenset[str] | set[str]
) -> common_pb2.Capabilities:
    out = common_pb2.Capabilities(
        os=str(caps.get("os", "")),
        arch=str(caps.get("arch", "")),
        tools=list(caps.get("tools", [])),
        hostname=str(caps.get("hostname", "")),
        agent_version=str(caps.get("agent_version", "")),
        tags=sorted(tags),
    )
    for k, v in dict(caps.get("labels", {})).items():
        out.labels[str(k)] = str(v)
    return out


@attrs.define(kw_only=True)
class NodeState:
    """One enrolled daemon as the event loop sees it."""

    node_id: str
    tenant_id: str
    public_key: bytes = attrs.field(repr=False)
    key_thumbprint: str
    enrolled_at: float
    revoked: bool = False
    revoked_reason: str = ""
    capabilities: dict[str, Any] = attrs.field(factory=dict)
    tags: set[str] = attrs.field(factory=set)
    token_jti: str = ""
    token_expires_at: float = 0.0
    tokens: TokenSuccession = attrs.field(factory=TokenSuccession)
    """Tokens issued to this node since the one it last confirmed holding."""

    @classmethod
    def from_record(cls, rec: NodeRecord) -> NodeState:
        return cls(
            node_id=rec.node_id,
            tenant_id=rec.tenant_id,
            public_key=rec.public_key,
            key_thumbprint=rec.key_thumbprint,
            enrolled_at=rec.enrolled_at,
            revoked=rec.revoked,
            revoked_reason=rec.revoked_reason,
            capabilities=dict(rec.capabilities),
            tags=set(rec.tags),
            token_jti=rec.token_jti,
            token_expires_at=rec.token_expires_at,
            tokens=TokenSuccession.starting_with(rec.token_jti, expires_at=rec.token_expires_at),
        )

    def core_record(self) -> CoreNodeRecord:
        return CoreNodeRecord(
            node_id=self.node_id,
            tenant_id=self.tenant_id,
            public_key=self.public_key,
            revoked=self.revoked,
        )

    def snapshot(self, status: str) -> DaemonSnapshot:
        caps = self.capabilities
        return DaemonSnapshot(
            node_id=self.node_id,
            tenant_id=self.tenant_id,
            status=status,
            os=str(caps.get("os", "")),
            arch=str(caps.get("arch", "")),
            tools=frozenset(caps.get("tools", ())),
            labels={str(k): str(v) for k, v in dict(caps.get("labels", {})).items()},
            tags=frozenset(self.tags),
        )


@attrs.frozen
class CloseStream:
    """Outbox sentinel: stop writing and end the RPC (with ``code`` unless it is None)."""

    code: grpc.StatusCode | None = None
    details: str = ""
    trailing_metadata: Metadata = ()


_stream_ids = itertools.count(1)


class StreamHandle:
    """One open ``EdgeStream.Connect`` call: its session and its ordered outbox."""

    def __init__(self, *, peer: str, max_message_bytes: int) -> None:
        self.id = next(_stream_ids)
        self.peer = peer
        self.session = RelaySession(max_message_bytes=max_message_bytes)
        self.outbox: asyncio.Queue[stream_pb2.RelayMessage | CloseStream] = asyncio.Queue()
        self.node_id: str | None = None
        self.tenant_id: str | None = None
        self.control = False
        self.attested = False
        self.connected_since = 0.0
        self.accounted_at = 0.0
        self.closing = False
        self.host_time: float | None = None
        self.hello_token = ""
        self.hello_capabilities: common_pb2.Capabilities | None = None
        self.refresh_limit_logged = False
        self.drain_due: float | None = None
        """``time.monotonic()`` at which a drained daemon is due back (its slot); the
        ``Drain``'s hint is counted from the moment it is written."""

    def flush(self) -> None:
        """Move what the session wants to say onto the outbox, in order."""
        for msg in self.session.messages_to_send():
            self.outbox.put_nowait(msg)

    def close(
        self, code: grpc.StatusCode | None = None, details: str = "", metadata: Metadata = ()
    ) -> None:
        """Write what is queued, then end the call. Idempotent."""
        if self.closing:
            return
        self.closing = True
        self.end(code, details, metadata)

    def stop_reading(self) -> None:
        """Take nothing more from the peer (the reader leaves at its next message); the
        call stays open until :meth:`end`."""
        self.closing = True

    def end(
        self, code: grpc.StatusCode | None = None, details: str = "", metadata: Metadata = ()
    ) -> None:
        """Write what is queued, then end the call (once, after :meth:`stop_reading`)."""
        self.flush()
        self.outbox.put_nowait(CloseStream(code, details, metadata))

    def refuse(
        self,
        reason: str,
        message: str,
        now: float,
        *,
        retry_after_secs: float = 0.0,
        code: str | None = None,
    ) -> None:
        """Write what is queued, then end the call with the refusal's status: the code
        from the core's table (or ``code``) and the reason in the status details."""
        st = refusal_status(reason, message, now, retry_after_secs=retry_after_secs, code=code)
        self.close(st.code, st.details, st.trailing_metadata)
