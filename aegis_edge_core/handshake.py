"""Bounds on daemon streams that have not finished the handshake: a deadline and a cap.

Theory of operation
-------------------
Until a stream has sent its hello and passed attestation, the relay knows nothing about
who is on the other end, yet the stream costs it memory and a place in its tables. Two
rules keep what a stranger can hold bounded:

* **Deadline.** A stream must be attested within ``deadline_secs`` (default 10 s) of being
  opened. One that is not is closed with ``DEADLINE_EXCEEDED`` and the reason
  ``handshake_timeout``, whether it sent nothing, only a hello, or a hello and then went
  quiet after the challenge.
* **Per-source cap.** At most ``max_unattested_per_source`` streams (default 1024) from one
  source address may be unattested at the same time. The next one is refused as it opens,
  with ``RESOURCE_EXHAUSTED`` and the reason ``too_many_unattested``. Attested streams do
  not count, so a flood from an address never touches the daemons already connected from
  it; a daemon that reconnects from a flooded address is refused until the flood's streams
  time out, and retries.

The relay shell drives a :class:`HandshakeGuard`:

    guard = HandshakeGuard(HandshakeLimits(deadline_secs=10, max_unattested_per_source=1024))
    refusal = guard.admit(stream_id, source="192.0.2.7", now=now)   # as the stream opens
    if refusal is not None:
        abort(refusal.grpc_status, refusal.message)
    ...
    guard.settle(stream_id)            # attested, or closed for any reason (idempotent)
    for refusal in guard.expire(now):  # at guard.next_deadline()
        close(refusal.stream_id, refusal.grpc_status, refusal.message)

Transitions of one stream id::

    (untracked) --admit, source under its cap--> PENDING
    (untracked) --admit, source at its cap-----> (untracked), refused too_many_unattested
    PENDING     --settle-----------------------> (untracked)
    PENDING     --expire(now >= deadline)------> (untracked), refused handshake_timeout
    (untracked) --settle-----------------------> (untracked)          (a documented no-op)
    PENDING     --admit------------------------> LocalProtocolError   (a bug in the shell)

Time is whatever the caller passes as ``now`` (seconds, one clock). A ``now`` earlier than
one already seen is taken as the latest seen, so deadlines are handed out in order and a
clock stepping back never postpones an expiry already due. Because every stream gets the
same ``deadline_secs``, pending streams expire in the order they were admitted: ``expire``
and ``next_deadline`` look only at the oldest, and every operation is O(1) (amortised for
``expire``: each stream is expired at most once). No timers: the shell sleeps until
:meth:`HandshakeGuard.next_deadline` and calls :meth:`HandshakeGuard.expire`.

Optional protocol features
--------------------------
A daemon names the optional features it speaks in ``Hello.features``; the relay answers
with the subset it uses on this stream in ``Accepted.features`` (:func:`negotiate`). An
older peer sends or answers none and gets the behaviour without them, so
``PROTOCOL_VERSION`` does not change:

* ``heartbeat-ack-coalesce`` (:data:`HEARTBEAT_ACK_COALESCE`): the relay acks one heartbeat
  in :func:`heartbeat_ack_every` -- as rarely as the daemon's stall detection allows;
* ``result-ack-batch`` (:data:`RESULT_ACK_BATCH`): one ``ResultAck`` names every result
  the relay stored together;
* ``heartbeat-keepalive`` (:data:`HEARTBEAT_KEEPALIVE`): the daemon's channel runs HTTP/2
  keepalive pings (``Hello.keepalive_secs``), answered inside grpc's C core, which notice a
  stopped relay or a dead connection within the stall bound. The relay's acks then only
  prove that its event loop runs and come :data:`KEEPALIVE_ACK_SPREAD` times more rarely
  (:func:`heartbeat_ack_every`). Granted only when the daemon's keepalive fits the relay's
  stall bound (:func:`keepalive_fits`);
* ``result-ack-deferred`` (:data:`RESULT_ACK_DEFERRED`): the relay holds the acks of stored
  results until the daemon's next heartbeat, and sends them *as* that heartbeat's ack: one
  ``ResultAck`` naming them and the heartbeat's ``seq`` (the next plain ack then comes
  ``heartbeat_ack_every`` beats later, so a sparse result adds no write). A fleet run's
  result then costs the relay no write of its own; the daemon keeps it spooled at most
  one heartbeat interval longer, and sends it again after a reconnect, as any
  unacknowledged result.

Like the rest of the core this module does no I/O and reads no clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

import attrs

from aegis_edge_core.daemon_rules import heartbeat_plan, stall_bound
from aegis_edge_core.errors import ConfigError, LocalProtocolError

__all__ = [
    "DEFAULT_HANDSHAKE_DEADLINE",
    "DEFAULT_MAX_UNATTESTED_PER_SOURCE",
    "FEATURES",
    "HANDSHAKE_TIMEOUT",
    "HEARTBEAT_ACK_COALESCE",
    "HEARTBEAT_KEEPALIVE",
    "KEEPALIVE_ACK_SPREAD",
    "RESULT_ACK_BATCH",
    "RESULT_ACK_DEFERRED",
    "TOO_MANY_UNATTESTED",
    "HandshakeGuard",
    "HandshakeLimits",
    "HandshakeRefusal",
    "grant",
    "heartbeat_ack_every",
    "keepalive_fits",
    "negotiate",
]

DEFAULT_HANDSHAKE_DEADLINE: Final = 10.0
"""Seconds from a stream's opening to its attestation; an honest daemon needs one round
trip and a signature, far below this even across the world."""

DEFAULT_MAX_UNATTESTED_PER_SOURCE: Final = 1024
"""Unattested streams at once from one address. Not lower, because a reconnect storm behind
one NAT address (or a loopback test fleet) has hundreds mid-handshake at the same moment;
one address can then hold at most this many streams for at most the deadline."""

HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
TOO_MANY_UNATTESTED: Final = "too_many_unattested"

HEARTBEAT_ACK_COALESCE: Final = "heartbeat-ack-coalesce"
RESULT_ACK_BATCH: Final = "result-ack-batch"
HEARTBEAT_KEEPALIVE: Final = "heartbeat-keepalive"
RESULT_ACK_DEFERRED: Final = "result-ack-deferred"
FEATURES: Final = frozenset(
    {HEARTBEAT_ACK_COALESCE, HEARTBEAT_KEEPALIVE, RESULT_ACK_BATCH, RESULT_ACK_DEFERRED}
)
"""Every optional feature this code speaks, on either end."""

KEEPALIVE_ACK_SPREAD: Final = 5
"""With ``heartbeat-keepalive`` the relay acks this many times more rarely than the stall
count alone allows (at 30 s / 90 s: one beat in 10, so a relay whose event loop is wedged
while grpc's core still answers pings is noticed after 11 beats, 5.5-6 minutes). Acks are
then a small part of the relay's steady CPU; rarer ones would save little and only
lengthen that bound."""


def negotiate(offered: Iterable[str], supported: Iterable[str] = FEATURES) -> tuple[str, ...]:
    """The features both ends speak (sorted): what the relay names in ``Accepted``, and all
    the daemon honours of what it names. Unknown names are ignored, never an error: they
    are a newer peer's."""
    return tuple(sorted(set(offered) & set(supported)))


def heartbeat_ack_every(
    interval_secs: float, stale_threshold_secs: float, *, keepalive: bool = False
) -> int:
    """How many heartbeats one ack may cover: one fewer than the daemon's stall count (the
    beats it lets go unanswered, :func:`~aegis_edge_core.daemon_rules.heartbeat_plan`), so a
    live relay's ack may still come a whole interval late, and a stalled relay is noticed
    as soon as before, the same number of beats after its last ack. With ``keepalive``
    (``heartbeat-keepalive``) the transport's pings catch a stalled relay within that
    bound, and the acks, left to catch a wedged event loop, are spread further."""
    stall_after = heartbeat_plan(interval_secs, stale_threshold_secs).stall_after
    every = max(1, stall_after - 1)
    return every * KEEPALIVE_ACK_SPREAD if keepalive else every


def keepalive_fits(
    keepalive_secs: float, interval_secs: float, stale_threshold_secs: float
) -> bool:
    """Whether a daemon whose channel notices a silent relay within ``keepalive_secs``
    (``Hello.keepalive_secs``) keeps the stall bound it has without the feature
    (:func:`~aegis_edge_core.daemon_rules.stall_bound`); 0 or less: it runs no keepalive."""
    if not (math.isfinite(keepalive_secs) and keepalive_secs > 0):
        return False
    # a daemon computes its keepalive from the same numbers: allow for float rounding
    return keepalive_secs <= stall_bound(interval_secs, stale_threshold_secs) + 1e-6


def grant(
    offered: Iterable[str],
    supported: Iterable[str],
    *,
    keepalive_secs: float,
    interval_secs: float,
    stale_threshold_secs: float,
) -> tuple[str, ...]:
    """The features a relay that uses ``supported`` names in ``Accepted`` for a daemon that
    offered ``offered``: :func:`negotiate`, less ``heartbeat-keepalive`` when the daemon's
    keepalive would not notice a stalled relay within the stall bound."""
    features = negotiate(offered, supported)
    if HEARTBEAT_KEEPALIVE in features and not keepalive_fits(
        keepalive_secs, interval_secs, stale_threshold_secs
    ):
        features = tuple(f for f in features if f != HEARTBEAT_KEEPALIVE)
    return features


def _finite(now: float) -> float:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


def _check_deadline(_inst: object, _attr: object, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(
            f"handshake deadline must be a positive number of seconds, got {value!r}",
            path="handshake_timeout",
            hint="e.g. 10s; an honest daemon attests within one round trip",
        )


def _check_cap(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            f"unattested-stream cap must be a whole number of at least 1, got {value!r}",
            path="max_unattested_per_source",
            hint="e.g. 1024, or off to disable the cap",
        )


@attrs.frozen(kw_only=True, slots=True)
class HandshakeLimits:
    """The two bounds; ``max_unattested_per_source=None`` turns the cap off."""

    deadline_secs: float = attrs.field(
        default=DEFAULT_HANDSHAKE_DEADLINE, validator=_check_deadline
    )
    max_unattested_per_source: int | None = attrs.field(
        default=DEFAULT_MAX_UNATTESTED_PER_SOURCE, validator=_check_cap
    )


@attrs.frozen(kw_only=True, slots=True)
class HandshakeRefusal:
    """Why a stream is refused or closed: close it with ``grpc_status`` and ``message``,
    count it under ``reason``."""

    stream_id: int
    source: str
    reason: str
    grpc_status: str
    """The gRPC status code's upper-case name (the core does not import grpc)."""
    message: str


class HandshakeGuard:
    """The unattested streams of one relay, in the order they were admitted."""

    def __init__(self, limits: HandshakeLimits) -> None:
        self.limits = limits
        self._pending: OrderedDict[int, tuple[str, float]] = OrderedDict()
        """stream id -> (source, deadline); deadlines never decrease along the order."""
        self._per_source: dict[str, int] = {}
        self._latest = -math.inf

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self, source: str) -> int:
        """Unattested streams from ``source`` right now."""
        return self._per_source.get(source, 0)

    def _clock(self, now: float) -> float:
        self._latest = max(self._latest, _finite(now))
        return self._latest

    def admit(self, stream_id: int, *, source: str, now: float) -> HandshakeRefusal | None:
        """A stream opens: ``None`` if it may proceed (its deadline starts now), else the
        refusal to answer it with (nothing is recorded for a refused stream)."""
        if stream_id in self._pending:
            raise LocalProtocolError(
                f"stream {stream_id} was admitted twice",
                hint="admit each stream once as it opens; settle it when it attests or closes",
            )
        now = self._clock(now)
        cap = self.limits.max_unattested_per_source
        held = self._per_source.get(source, 0)
        if cap is not None and held >= cap:
            return HandshakeRefusal(
                stream_id=stream_id,
                source=source,
                reason=TOO_MANY_UNATTESTED,
                grpc_status="RESOURCE_EXHAUSTED",
                message=(
                    f"too many unattested streams from {source} ({held} open, cap {cap}); "
                    f"finish the handshake on the open ones or retry once they are gone"
                ),
            )
        self._pending[stream_id] = (source, now + self.limits.deadline_secs)
        self._per_source[source] = held + 1
        return None

    def settle(self, stream_id: int) -> None:
        """The stream attested or closed: its deadline and its place under the cap end.
        Idempotent, so the shell may call it from a ``finally`` block."""
        entry = self._pending.pop(stream_id, None)
        if entry is not None:
            self._release(entry[0])

    def _release(self, source: str) -> None:
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to do (``None``: nothing is pending)."""
        for _source, deadline in self._pending.values():
            return deadline
        return None

    def expire(self, now: float) -> list[HandshakeRefusal]:
        """Every pending stream whose deadline is at or before ``now``, oldest first; each
        is forgotten here and must be closed by the shell with the refusal's status."""
        now = self._clock(now)
        out: list[HandshakeRefusal] = []
        secs = self.limits.deadline_secs
        while self._pending:
            stream_id, (source, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                break
            del self._pending[stream_id]
            self._release(source)
            out.append(
                HandshakeRefusal(
                    stream_id=stream_id,
                    source=source,
                    reason=HANDSHAKE_TIMEOUT,
                    grpc_status="DEADLINE_EXCEEDED",
                    message=(
                        f"no hello/attestation within {secs:g}s: the relay closes streams "
                        f"that do not finish the handshake in time; reconnect"
                    ),
                )
            )
        return out
