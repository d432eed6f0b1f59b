"""Daemon health: a pure state machine over stream events and an injected clock.

Theory of operation
-------------------
Each enrolled daemon is in one of four statuses (:class:`DaemonStatus`), spelled exactly as
the operator sees them and as the ``status`` label of ``aegis_edge_daemons_total``:

* ``Connected`` -- an attested stream is open and a sign of life arrived recently;
* ``Unhealthy`` -- the stream is open but nothing arrived for more than
  ``stale_threshold_secs``;
* ``Disconnected`` -- no stream is open;
* ``Revoked`` -- the relay revoked the daemon. Final: nothing brings it back (re-enrolling
  makes a *new* node id).

The status moves only on :class:`HealthEvent` values. Four come from the relay's stream handler
(``ATTESTED``, ``HEARTBEAT``, ``STREAM_CLOSED``, ``REVOKED``); the fifth, ``STALE``, is produced
by :meth:`HealthTracker.tick` when a daemon's last sign of life is too old. Every legal
``(status, event)`` pair is a row of :data:`HEALTH_TRANSITIONS`. A row whose target equals its
source is a *documented no-op*: the event is legal at that moment (usually a race between the
network and the relay's bookkeeping) and changes nothing. A pair missing from the table is a
bug in the caller and raises :class:`HealthProtocolError`. There are exactly two:

* ``(Revoked, ATTESTED)`` -- the relay must refuse attestation of a revoked daemon (reason
  ``revoked``); marking it attested would resurrect it.
* ``(untracked, HEARTBEAT)`` -- heartbeats only flow on streams the relay attested, so a
  heartbeat for a node the tracker never saw means the relay skipped :meth:`attested` (or
  :meth:`forget`-ed a node whose stream it had not dropped).

"Untracked" is spelled ``None`` in the table: a node the tracker does not know. Attestation or
revocation start tracking it; closing a stream it never attested is a no-op, so a relay may call
:meth:`HealthTracker.stream_closed` from a ``finally`` block whether or not attestation passed.

Two no-ops deserve a sentence. A ``HEARTBEAT`` while ``Disconnected`` is ignored: only
attestation opens a stream, and a heartbeat that raced its own stream's close proves nothing
about the next one. A second ``ATTESTED`` while ``Connected`` (the daemon reconnected before
the relay noticed the old stream die) keeps ``Connected`` and refreshes liveness; pass
``stream_id`` to :meth:`HealthTracker.attested` and :meth:`HealthTracker.stream_closed` so the
late close of the superseded stream is recognised and ignored instead of marking a live daemon
``Disconnected``.

Staleness
---------
A daemon with an open stream becomes ``Unhealthy`` at the first :meth:`HealthTracker.tick`
whose ``now`` satisfies ``now - last_seen_at > stale_threshold_secs`` -- *strictly* greater.
``last_seen_at`` is the time of the last heartbeat or attestation. The seed says a daemon is
Unhealthy "when no heartbeat has arrived *within* stale_threshold_secs", and a heartbeat landing
exactly on the threshold arrived within it. The comparison is evaluated exactly as written (not
as ``now > last + threshold``, which rounds differently for floats), so the tracker agrees with
a naive model bit for bit. The next heartbeat (or a fresh attestation) returns it to
``Connected``; ``tick`` never does, because the seed ties recovery to a heartbeat.

Cost, for 10k+ daemons
----------------------
A heartbeat is O(1): it overwrites the node's ``last_seen_at`` and touches no index. Each
``Connected`` node owns one entry in a min-heap keyed by the ``last_seen_at`` it had when the
entry was pushed ("armed"), which is never later than its current one. ``tick`` pops entries
whose key is stale; for each it re-reads the node: if the node really is stale it becomes
``Unhealthy``, otherwise the entry is pushed again with the node's current ``last_seen_at``.
So ``tick`` costs O(log n) per daemon that goes stale plus, amortised, one re-arm per healthy
daemon per threshold window (about n / 90 per second at defaults) -- never a scan. Entries of
nodes that left ``Connected`` are invalidated lazily (a sequence number) and the heap is
rebuilt if dead entries ever outnumber live ones. Because the heap key never exceeds the true
``last_seen_at`` and float subtraction is monotonic, a stale node's entry is always among the
popped ones: the lazy index is exact, even if callers pass a ``now`` that goes backwards.

Everything here is sans-I/O: ``now`` is seconds since the Unix epoch, passed in by the caller.
Each event method returns the list of :class:`Transition` values it caused (empty when the
status did not change) so the relay can update gauges, count and log them.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

import attrs

from aegis_edge_core import DEFAULT_HEARTBEAT_INTERVAL_SECS
from aegis_edge_core.errors import ConfigError, LocalProtocolError

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_SECS",
    "DEFAULT_STALE_THRESHOLD_SECS",
    "HEALTH_TRANSITIONS",
    "DaemonStatus",
    "HealthEvent",
    "HealthProtocolError",
    "HealthSettings",
    "HealthTracker",
    "NodeHealth",
    "StreamId",
    "Transition",
    "next_status",
]

DEFAULT_STALE_THRESHOLD_SECS = 90.0
"""Silence after which an open stream counts as Unhealthy: three missed heartbeats."""

StreamId = str | int
"""Anything the relay uses to tell two streams of the same node apart."""


class DaemonStatus(enum.StrEnum):
    """A daemon's health as operators see it; the values are the metric label values."""

    CONNECTED = "Connected"
    UNHEALTHY = "Unhealthy"
    DISCONNECTED = "Disconnected"
    REVOKED = "Revoked"


class HealthEvent(enum.StrEnum):
    """What can happen to a daemon. ``STALE`` is produced by :meth:`HealthTracker.tick`."""

    ATTESTED = "attested"
    HEARTBEAT = "heartbeat"
    STREAM_CLOSED = "stream_closed"
    REVOKED = "revoked"
    STALE = "stale"


class HealthProtocolError(LocalProtocolError):
    """The relay fed the health machine an event that cannot happen in the current status."""


_C = DaemonStatus.CONNECTED
_U = DaemonStatus.UNHEALTHY
_D = DaemonStatus.DISCONNECTED
_R = DaemonStatus.REVOKED
_E = HealthEvent

HEALTH_TRANSITIONS: Mapping[tuple[DaemonStatus | None, HealthEvent], DaemonStatus | None] = (
    MappingProxyType(
        {
            # Untracked (None): the tracker has never seen the node, or forgot it.
            (None, _E.ATTESTED): _C,
            (None, _E.REVOKED): _R,
            (None, _E.STREAM_CLOSED): None,  # no-op: a stream that failed attestation closes
            (None, _E.STALE): None,  # no-op: nothing to go stale
            # (None, HEARTBEAT) is missing on purpose: heartbeats need an attested stream.
            (_C, _E.ATTESTED): _C,  # no-op on status: reconnect raced the old stream's close
            (_C, _E.HEARTBEAT): _C,
            (_C, _E.STALE): _U,
            (_C, _E.STREAM_CLOSED): _D,
            (_C, _E.REVOKED): _R,
            (_U, _E.ATTESTED): _C,
            (_U, _E.HEARTBEAT): _C,
            (_U, _E.STALE): _U,  # no-op: already Unhealthy
            (_U, _E.STREAM_CLOSED): _D,
            (_U, _E.REVOKED): _R,
            (_D, _E.ATTESTED): _C,
            (_D, _E.HEARTBEAT): _D,  # no-op: a heartbeat that raced its stream's close
            (_D, _E.STALE): _D,  # no-op: no stream, nothing to go stale
            (_D, _E.STREAM_CLOSED): _D,  # no-op: closing is idempotent
            (_D, _E.REVOKED): _R,
            # Revoked is final. (Revoked, ATTESTED) is missing on purpose: the relay must
            # refuse attestation of a revoked daemon, not report it.
            (_R, _E.HEARTBEAT): _R,  # no-op: in flight while the relay drops the stream
            (_R, _E.STALE): _R,
            (_R, _E.STREAM_CLOSED): _R,  # no-op: the relay drops the stream after revoking
            (_R, _E.REVOKED): _R,  # no-op: revocation is idempotent
        }
    )
)
"""Every legal ``(status, event) -> status``; ``None`` is "untracked". Missing pairs raise."""


def next_status(status: DaemonStatus | None, event: HealthEvent) -> DaemonStatus | None:
    """Answer the table: the status after ``event``, or raise :class:`HealthProtocolError`.

    ``None`` stands for a node the tracker does not know. The answer depends on nothing but
    the pair, so callers may precompute or memoise it.
    """
    try:
        return HEALTH_TRANSITIONS[(status, event)]
    except KeyError:
        pass
    if status is DaemonStatus.REVOKED:
        raise HealthProtocolError(
            f"a Revoked daemon cannot be {event.value}",
            hint="refuse its attestation with reason 'revoked'; it must re-enroll",
        )
    where = "an untracked daemon" if status is None else f"a {status.value} daemon"
    raise HealthProtocolError(
        f"event {event.value!r} is not allowed for {where}",
        hint="heartbeats are only accepted on a stream the relay attested",
    )


def _positive_finite(name: str) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number of seconds, got {value!r}", path=name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"expected a positive number of seconds, got {value!r}", path=name)

    return check


@attrs.frozen(kw_only=True)
class HealthSettings:
    """The two clocks of the health machine, validated together.

    The threshold must exceed the interval, otherwise every daemon would flap to Unhealthy
    between two on-time heartbeats.
    """

    heartbeat_interval_secs: float = attrs.field(
        default=DEFAULT_HEARTBEAT_INTERVAL_SECS,
        converter=float,
        validator=_positive_finite("heartbeat_interval_secs"),
    )
    stale_threshold_secs: float = attrs.field(
        default=DEFAULT_STALE_THRESHOLD_SECS,
        converter=float,
        validator=_positive_finite("stale_threshold_secs"),
    )

    def __attrs_post_init__(self) -> None:
        if self.stale_threshold_secs <= self.heartbeat_interval_secs:
            raise ConfigError(
                f"must be greater than the heartbeat interval ({self.heartbeat_interval_secs}s),"
                f" got {self.stale_threshold_secs}s",
                path="stale_threshold_secs",
                hint="the default is 3x the heartbeat interval",
            )


def _non_empty_str(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise HealthProtocolError(f"{attr.name} must be a non-empty string, got {value!r}")


@attrs.frozen(kw_only=True)
class Transition:
    """One status change of one daemon, caused by ``cause`` at ``at`` (the event's ``now``).

    ``old`` is ``None`` when the node was untracked before (first attestation, or a revoke of
    a node the tracker had not loaded).
    """

    node_id: str = attrs.field(validator=_non_empty_str)
    old: DaemonStatus | None
    new: DaemonStatus
    at: float
    cause: HealthEvent


@attrs.frozen(kw_only=True)
class NodeHealth:
    """A read-only snapshot of one daemon's health.

    ``last_seen_at`` drives staleness (last heartbeat or attestation); ``last_heartbeat_at``
    is what operators see as ``last_heartbeat_at``; ``since`` is when ``status`` began.
    """

    node_id: str
    status: DaemonStatus
    last_heartbeat_at: float | None
    last_seen_at: float | None
    since: float | None


class _Node:
    """Mutable bookkeeping for one daemon; never handed out (see :class:`NodeHealth`)."""

    __slots__ = (
        "armed",
        "armed_key",
        "last_heartbeat_at",
        "last_seen_at",
        "since",
        "status",
        "stream_id",
    )

    def __init__(self, status: DaemonStatus, since: float | None) -> None:
        self.status = status
        self.since = since
        self.last_heartbeat_at: float | None = None
        self.last_seen_at: float | None = None
        self.stream_id: StreamId | None = None
        # Sequence number of this node's live heap entry, or None when not armed.
        self.armed: int | None = None
        self.armed_key = math.inf


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise HealthProtocolError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


class HealthTracker:
    """Health of every daemon a relay knows, with an O(1) heartbeat and a lazy stale index.

    The relay holds one tracker for its whole fleet, seeds it with :meth:`load` from the store
    on startup, calls the event methods from its stream handlers and :meth:`tick` from a timer
    (:meth:`next_deadline` says when a tick could next change anything). Methods are not
    thread-safe; call them from one event loop.
    """

    __slots__ = ("_armed_count", "_counts", "_heap", "_nodes", "_seq", "settings")

    def __init__(
        self,
        *,
        stale_threshold_secs: float = DEFAULT_STALE_THRESHOLD_SECS,
        heartbeat_interval_secs: float = DEFAULT_HEARTBEAT_INTERVAL_SECS,
    ) -> None:
        self.settings = HealthSettings(
            stale_threshold_secs=stale_threshold_secs,
            heartbeat_interval_secs=heartbeat_interval_secs,
        )
        self._nodes: dict[str, _Node] = {}
        self._counts: dict[DaemonStatus, int] = dict.fromkeys(DaemonStatus, 0)
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._armed_count = 0

    @property
    def stale_threshold_secs(self) -> float:
        """Seconds of silence after which an open stream is Unhealthy (strictly more than)."""
        return self.settings.stale_threshold_secs

    @property
    def heartbeat_interval_secs(self) -> float:
        """The interval the relay tells daemons to heartbeat at."""
        return self.settings.heartbeat_interval_secs

    # -- seeding ----------------------------------------------------------------------------

    def load(
        self,
        node_id: str,
        status: DaemonStatus | str,
        last_heartbeat_at: float | None = None,
    ) -> DaemonStatus:
        """Seed one daemon from a stored row after a relay (re)start; return its status.

        No stream survives a relay restart, so every stored status except ``Revoked`` loads as
        ``Disconnected``. Loading a node twice is a bug and raises.
        """
        if not isinstance(node_id, str) or not node_id:
            raise HealthProtocolError(f"node_id must be a non-empty string, got {node_id!r}")
        if node_id in self._nodes:
            raise HealthProtocolError(
                f"node {node_id!r} is already tracked",
                hint="load() seeds a fresh tracker from the store, once per node",
            )
        try:
            stored = DaemonStatus(status)
        except ValueError:
            raise HealthProtocolError(
                f"unknown stored status {status!r} for node {node_id!r}",
                hint="expected one of " + ", ".join(s.value for s in DaemonStatus),
            ) from None
        loaded = _R if stored is _R else _D
        node = _Node(loaded, since=None)
        if last_heartbeat_at is not None:
            node.last_heartbeat_at = node.last_seen_at = _check_now(last_heartbeat_at)
        self._nodes[node_id] = node
        self._counts[loaded] += 1
        return loaded

    # -- events -----------------------------------------------------------------------------

    def attested(
        self, node_id: str, now: float, *, stream_id: StreamId | None = None
    ) -> list[Transition]:
        """A stream of ``node_id`` passed attestation: the daemon is Connected.

        ``stream_id`` names the stream; a later :meth:`stream_closed` for a different stream id
        (the superseded one) is ignored. Raises :class:`HealthProtocolError` if the daemon is
        Revoked.
        """
        now = _check_now(now)
        node = self._nodes.get(node_id)
        old = node.status if node is not None else None
        new = next_status(old, _E.ATTESTED)
        assert new is not None
        if node is None:
            if not isinstance(node_id, str) or not node_id:
                raise HealthProtocolError(f"node_id must be a non-empty string, got {node_id!r}")
            node = _Node(new, since=now)
            self._nodes[node_id] = node
            self._counts[new] += 1
        node.stream_id = stream_id
        node.last_seen_at = now
        return self._move(node_id, node, old=old, new=new, now=now, cause=_E.ATTESTED)

    def heartbeat(self, node_id: str, now: float) -> list[Transition]:
        """A heartbeat arrived. Connected or Unhealthy become Connected; see the table."""
        now = _check_now(now)
        node = self._nodes.get(node_id)
        old = node.status if node is not None else None
        new = next_status(old, _E.HEARTBEAT)
        if node is None or new is not _C:
            return []  # the documented no-ops (Disconnected, Revoked)
        node.last_seen_at = node.last_heartbeat_at = now
        return self._move(node_id, node, old=old, new=new, now=now, cause=_E.HEARTBEAT)

    def stream_closed(
        self, node_id: str, now: float, *, stream_id: StreamId | None = None
    ) -> list[Transition]:
        """The daemon's stream ended. Safe to call for any stream, attested or not.

        If both this ``stream_id`` and the one given to :meth:`attested` are set and differ,
        the closing stream was superseded by a newer one and nothing changes.
        """
        now = _check_now(now)
        node = self._nodes.get(node_id)
        if node is None:
            return []
        if stream_id is not None and node.stream_id is not None and stream_id != node.stream_id:
            return []
        new = next_status(node.status, _E.STREAM_CLOSED)
        assert new is not None
        if new is not node.status:
            node.stream_id = None
        return self._move(node_id, node, old=node.status, new=new, now=now, cause=_E.STREAM_CLOSED)

    def revoked(self, node_id: str, now: float) -> list[Transition]:
        """The daemon was revoked. Final; tracked even if it was unknown before."""
        now = _check_now(now)
        node = self._nodes.get(node_id)
        if node is None:
            if not isinstance(node_id, str) or not node_id:
                raise HealthProtocolError(f"node_id must be a non-empty string, got {node_id!r}")
            node = _Node(_R, since=now)
            self._nodes[node_id] = node
            self._counts[_R] += 1
            return [Transition(node_id=node_id, old=None, new=_R, at=now, cause=_E.REVOKED)]
        new = next_status(node.status, _E.REVOKED)
        assert new is not None
        node.stream_id = None
        return self._move(node_id, node, old=node.status, new=new, now=now, cause=_E.REVOKED)

    def forget(self, node_id: str) -> DaemonStatus | None:
        """Stop tracking ``node_id`` (its row was deleted); return the status it had.

        Drop the daemon's stream first: a heartbeat for a forgotten node raises.
        """
        node = self._nodes.pop(node_id, None)
        if node is None:
            return None
        self._counts[node.status] -= 1
        self._disarm(node)
        return node.status

    def tick(self, now: float) -> list[Transition]:
        """Mark every open-stream daemon silent for more than the threshold Unhealthy."""
        now = _check_now(now)
        threshold = self.settings.stale_threshold_secs
        heap = self._heap
        out: list[Transition] = []
        while heap and now - heap[0][0] > threshold:
            _key, seq, node_id = heapq.heappop(heap)
            node = self._nodes.get(node_id)
            if node is None or node.armed != seq:
                continue  # a dead entry: the node left Connected or was re-armed since
            node.armed = None
            self._armed_count -= 1
            seen = node.last_seen_at
            assert seen is not None
            if now - seen > threshold:
                new = next_status(node.status, _E.STALE)
                assert new is not None
                out.extend(
                    self._move(node_id, node, old=node.status, new=new, now=now, cause=_E.STALE)
                )
            else:
                self._arm(node_id, node)
        return out

    # -- queries ----------------------------------------------------------------------------

    def status(self, node_id: str) -> DaemonStatus | None:
        """The daemon's status, or ``None`` if it is not tracked."""
        node = self._nodes.get(node_id)
        return node.status if node is not None else None

    def get(self, node_id: str) -> NodeHealth | None:
        """A snapshot of one daemon, or ``None`` if it is not tracked."""
        node = self._nodes.get(node_id)
        if node is None:
            return None
        return NodeHealth(
            node_id=node_id,
            status=node.status,
            last_heartbeat_at=node.last_heartbeat_at,
            last_seen_at=node.last_seen_at,
            since=node.since,
        )

    def counts(self) -> dict[DaemonStatus, int]:
        """How many tracked daemons are in each status (every status present, maybe 0)."""
        return dict(self._counts)

    def next_deadline(self) -> float | None:
        """A time after which :meth:`tick` may change something; ``None`` if none is open.

        Ticking earlier is harmless and ticking later only delays the Unhealthy mark. Because
        entries are re-armed lazily the answer may be early, never late.
        """
        heap = self._heap
        while heap:
            _key, seq, node_id = heap[0]
            node = self._nodes.get(node_id)
            if node is not None and node.armed == seq:
                return heap[0][0] + self.settings.stale_threshold_secs
            heapq.heappop(heap)
        return None

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._nodes))

    # -- internals --------------------------------------------------------------------------

    def _move(
        self,
        node_id: str,
        node: _Node,
        *,
        old: DaemonStatus | None,
        new: DaemonStatus,
        now: float,
        cause: HealthEvent,
    ) -> list[Transition]:
        if new is _C:
            if node.armed is None:
                self._arm(node_id, node)
            elif node.last_seen_at is not None and node.last_seen_at < node.armed_key:
                # A caller's clock went backwards: the entry's key must never exceed the node's
                # last_seen_at, or tick could miss it.
                self._arm(node_id, node)
        else:
            self._disarm(node)
        if old is new:
            return []
        if old is not None:
            self._counts[old] -= 1
            self._counts[new] += 1
        node.status = new
        node.since = now
        return [Transition(node_id=node_id, old=old, new=new, at=now, cause=cause)]

    def _arm(self, node_id: str, node: _Node) -> None:
        seen = node.last_seen_at
        assert seen is not None
        if node.armed is None:
            self._armed_count += 1
        self._seq += 1
        node.armed = self._seq
        node.armed_key = seen
        heapq.heappush(self._heap, (seen, self._seq, node_id))
        if len(self._heap) > 2 * self._armed_count + 1024:
            self._compact()

    def _disarm(self, node: _Node) -> None:
        if node.armed is not None:
            node.armed = None
            self._armed_count -= 1

    def _compact(self) -> None:
        nodes = self._nodes
        live = []
        for entry in self._heap:
            node = nodes.get(entry[2])
            if node is not None and node.armed == entry[1]:
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
