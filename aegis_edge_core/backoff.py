"""Reconnect backoff for the daemon: a stepped schedule, jitter, and a reset rule.

Theory of operation
-------------------
A daemon that loses (or cannot open) its stream waits before the next attempt. The waits follow
a *schedule* of steps, by default ``(1, 2, 5, 15, 60)`` seconds: the first wait uses the first
step, the second wait the second, and so on; once the schedule is exhausted every further wait
uses the last step, which is therefore the *cap*.

Jitter ("equal jitter" when ``jitter`` is 0.5, the default). Each wait is drawn uniformly from
``[step * (1 - jitter), step]`` with the caller's ``random.Random``. It never exceeds the step,
so it never exceeds the cap, and never drops below half the step, so a daemon never spins in a
hot retry loop. Why this matters: when a relay restarts, all 10k daemons lose their stream in
the same instant; with jitter their first attempts spread over half a second instead of landing
together, those the busy relay refuses spread again over ``[1, 2]`` s, then ``[2.5, 5]`` s and so
on -- each round spreads the herd wider in absolute time. ``jitter=0`` gives the bare schedule
(useful in tests); ``jitter=1`` is "full jitter" over ``[0, step]``.

Drain. A relay that shuts down or hands a daemon off sends ``Drain`` with
``reconnect_after_secs``: "come back after X". An older relay gives every daemon the same X in
the same instant, so X alone would bring the whole fleet back in one burst -- exactly what the
jitter above exists to prevent. :meth:`Backoff.after_drain` draws the wait from
``[X, X + jitter * min(X, step0)]`` instead (``step0`` the schedule's first step): never
earlier than the relay asked, spread by up to half a first step. A relay that spreads its
fleet itself gives each stream its own X (:mod:`aegis_edge_core.drain`); the added jitter is
then small beside the relay's spacing, where a multiple of X would widen the spread the relay
chose. X of 0 (no hint) means "use the schedule". A drain is a polite disconnect, not a
failure: it does not climb the schedule.

Drain window. A drained daemon knows its relay is restarting (or handing it off), not that the
network is broken; the new relay may not listen yet when the daemon comes back, and a refused
attempt there must not push the daemon up the ladder (with 10k daemons, a restart whose old
process takes seconds to close its streams used to leave every daemon on its 15-60 s steps by
the time the new one listened). So when the loop passes ``now`` to :meth:`Backoff.after_drain`,
the schedule starts again at the bottom, and failed attempts within ``drain_window`` seconds
of that drain (default 10 s; ``now`` passed to :meth:`Backoff.next_delay`) all draw from the
bottom step -- jittered, ``[step0 * (1 - jitter), step0]`` -- without climbing. An accepted
stream ends the window; after the window (a relay that did not come back) the schedule climbs
as usual from the bottom. Without ``now`` both calls behave as before. 10 s covers a relay
restart (the old process ends its streams and exits, the new one starts listening); a relay
still gone after that is an outage, and the ladder is what dampens those.

Reset rule. Reaching a relay is not the same as staying connected: a flapping link (TLS up,
dropped seconds later) must keep climbing the schedule, or it would hammer the relay every
second. So the schedule only starts again at the bottom when a connection *stayed up* for at
least ``reset_after`` seconds, checked when it ends (:meth:`Backoff.disconnected`). The default
is twice the cap (120 s with the default schedule): a link that survives two full cap intervals
has shown it is not flapping at the rate the backoff is trying to dampen, and with the default
30 s heartbeat it has carried several heartbeats. "Connected" means the relay accepted the
stream (attestation passed): an attempt refused at attestation -- revoked, clock skew -- never
connects and keeps climbing.

:class:`BackoffPolicy` is an immutable, validated value (the configuration).
:class:`Backoff` is a small mutable state object -- one per connection loop -- because the loop
advances it on every attempt and copying a value each time would buy nothing. Its transitions
form a two-state table (:data:`BACKOFF_TRANSITIONS`); calls outside it raise
:class:`BackoffProtocolError`. Typical loop::

    backoff = Backoff(BackoffPolicy())
    while True:
        try:
            stream = connect_and_attest()          # I/O, in the agent
        except ConnectError:
            sleep(backoff.next_delay(rng, clock())); continue
        backoff.connected(clock())
        hint = serve(stream)                       # returns when the stream drops; on a
        backoff.disconnected(clock())              # Drain: after_drain(X, rng, clock())
        sleep(hint if hint is not None else backoff.next_delay(rng, clock()))

Nothing here reads the clock or draws randomness on its own: ``now`` and ``rng`` are passed in.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from aegis_edge_core.errors import ConfigError, LocalProtocolError

if TYPE_CHECKING:
    import random  # only the type: randomness always comes from the caller's Random

__all__ = [
    "BACKOFF_TRANSITIONS",
    "DEFAULT_DRAIN_WINDOW",
    "DEFAULT_JITTER",
    "DEFAULT_SCHEDULE",
    "Backoff",
    "BackoffEvent",
    "BackoffPolicy",
    "BackoffProtocolError",
    "LinkState",
]

DEFAULT_SCHEDULE: tuple[float, ...] = (1.0, 2.0, 5.0, 15.0, 60.0)
"""The seed's reconnect schedule, in seconds; the last step is the cap."""

DEFAULT_JITTER = 0.5
"""Fraction of each step that is randomised: waits fall in ``[step * (1 - j), step]``."""

DEFAULT_DRAIN_WINDOW = 10.0
"""Seconds after a relay's ``Drain`` during which failed attempts do not climb the schedule."""


class BackoffProtocolError(LocalProtocolError):
    """The connection loop called :class:`Backoff` out of order (a bug in the loop)."""


def _to_schedule(value: Iterable[float]) -> tuple[float, ...]:
    if isinstance(value, str | bytes):
        raise ConfigError(f"expected a list of seconds, got {value!r}", path="backoff.schedule")
    out = []
    for i, step in enumerate(value):
        if isinstance(step, bool) or not isinstance(step, int | float):
            raise ConfigError(
                f"expected a number of seconds, got {step!r}", path=f"backoff.schedule[{i}]"
            )
        out.append(float(step))
    return tuple(out)


def _check_schedule(_inst: object, _attr: object, value: tuple[float, ...]) -> None:
    if not value:
        raise ConfigError("expected at least one step, got an empty list", path="backoff.schedule")
    for i, step in enumerate(value):
        if not math.isfinite(step) or step <= 0:
            raise ConfigError(
                f"expected a positive number of seconds, got {step!r}",
                path=f"backoff.schedule[{i}]",
            )
        if i and step < value[i - 1]:
            raise ConfigError(
                f"steps must not decrease, got {value[i - 1]!r} then {step!r}",
                path=f"backoff.schedule[{i}]",
                hint="the last step is the cap",
            )


def _check_jitter(_inst: object, _attr: object, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"expected a fraction in [0, 1], got {value!r}", path="backoff.jitter")


def _check_reset_after(_inst: object, _attr: object, value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(
            f"expected a non-negative number of seconds, got {value!r}",
            path="backoff.reset_after",
        )


def _check_drain_window(_inst: object, _attr: object, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(
            f"expected a non-negative number of seconds, got {value!r}",
            path="backoff.drain_window",
        )


@attrs.frozen(kw_only=True)
class BackoffPolicy:
    """The schedule, jitter fraction and reset threshold; validated on construction.

    ``reset_after`` defaults (``None``) to twice the cap; read the effective value from
    :attr:`reset_after_secs`.
    """

    schedule: tuple[float, ...] = attrs.field(
        default=DEFAULT_SCHEDULE, converter=_to_schedule, validator=_check_schedule
    )
    jitter: float = attrs.field(default=DEFAULT_JITTER, validator=_check_jitter)
    reset_after: float | None = attrs.field(default=None, validator=_check_reset_after)
    drain_window: float = attrs.field(default=DEFAULT_DRAIN_WINDOW, validator=_check_drain_window)

    @property
    def cap(self) -> float:
        """The longest wait: the last step of the schedule."""
        return self.schedule[-1]

    @property
    def reset_after_secs(self) -> float:
        """How long a connection must stay up for the schedule to start again at the bottom."""
        return 2 * self.cap if self.reset_after is None else float(self.reset_after)

    def step(self, attempt: int) -> float:
        """The un-jittered step for the ``attempt``-th wait (0-based); the cap past the end."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return self.schedule[min(attempt, len(self.schedule) - 1)]

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The closed interval the ``attempt``-th wait is drawn from."""
        step = self.step(attempt)
        return (step * (1 - self.jitter), step)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Draw the ``attempt``-th wait. Consumes exactly one ``rng.random()`` value."""
        low, high = self.bounds(attempt)
        # Clamp: low + (high - low) * r can round a hair outside [low, high].
        return min(high, max(low, low + (high - low) * rng.random()))

    def drain_delay(self, reconnect_after: float, rng: random.Random) -> float | None:
        """The wait after a relay's ``Drain`` asking to come back after ``reconnect_after``
        seconds: drawn from ``[after, after + jitter * min(after, step0)]``; ``None`` when the
        relay gave no positive hint (use :meth:`Backoff.next_delay`). Consumes one
        ``rng.random()`` value when it returns a number."""
        if not math.isfinite(reconnect_after) or reconnect_after <= 0:
            return None
        low = reconnect_after
        high = low + self.jitter * min(low, self.schedule[0])
        return min(high, max(low, low + (high - low) * rng.random()))


class LinkState(enum.Enum):
    """Whether the connection loop currently holds an accepted stream."""

    DISCONNECTED = "disconnected"
    CONNECTED = "connected"


class BackoffEvent(enum.Enum):
    """Calls on :class:`Backoff`, as events of its table."""

    NEXT_DELAY = "next_delay"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


BACKOFF_TRANSITIONS: Mapping[tuple[LinkState, BackoffEvent], LinkState] = MappingProxyType(
    {
        (LinkState.DISCONNECTED, BackoffEvent.NEXT_DELAY): LinkState.DISCONNECTED,
        (LinkState.DISCONNECTED, BackoffEvent.CONNECTED): LinkState.CONNECTED,
        # No-op: a failed attempt may be reported as a disconnect; nothing was up to reset.
        (LinkState.DISCONNECTED, BackoffEvent.DISCONNECTED): LinkState.DISCONNECTED,
        (LinkState.CONNECTED, BackoffEvent.DISCONNECTED): LinkState.DISCONNECTED,
        # (CONNECTED, NEXT_DELAY) and (CONNECTED, CONNECTED) are missing on purpose: waiting
        # or connecting again while a stream is up means the loop lost track of its stream.
    }
)
"""Every legal ``(state, call) -> state`` of :class:`Backoff`; other calls raise."""


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise BackoffProtocolError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


class Backoff:
    """The backoff state of one connection loop. Mutable; not thread-safe.

    ``attempt`` counts the waits drawn since the last reset, so the next wait uses
    ``policy.step(attempt)``.
    """

    __slots__ = ("_attempt", "_connected_at", "_drained_at", "_state", "policy")

    def __init__(self, policy: BackoffPolicy | None = None) -> None:
        self.policy = policy if policy is not None else BackoffPolicy()
        self._attempt = 0
        self._state = LinkState.DISCONNECTED
        self._connected_at: float | None = None
        self._drained_at: float | None = None

    def __repr__(self) -> str:
        return f"Backoff(attempt={self._attempt}, state={self._state.value}, policy={self.policy})"

    @property
    def attempt(self) -> int:
        """Waits drawn since the schedule last started at the bottom."""
        return self._attempt

    @property
    def state(self) -> LinkState:
        """Whether a stream is currently up."""
        return self._state

    @property
    def connected_at(self) -> float | None:
        """When the current stream was accepted, or ``None`` while disconnected."""
        return self._connected_at

    def _advance(self, event: BackoffEvent) -> LinkState:
        try:
            return BACKOFF_TRANSITIONS[(self._state, event)]
        except KeyError:
            raise BackoffProtocolError(
                f"{event.value}() called while {self._state.value}",
                hint="call disconnected(now) when the stream drops, before waiting again",
            ) from None

    @property
    def drained_at(self) -> float | None:
        """When the last ``Drain`` (passed with ``now``) arrived, until a stream is accepted
        again; ``None`` otherwise."""
        return self._drained_at

    def in_drain_window(self, now: float) -> bool:
        """Whether a failure at ``now`` follows a drain closely enough not to climb."""
        return self._drained_at is not None and 0 <= now - self._drained_at <= (
            self.policy.drain_window
        )

    def next_delay(self, rng: random.Random, now: float | None = None) -> float:
        """Draw the next wait in seconds and climb one step. Only while disconnected.

        With ``now`` within the drain window (see the module's *Drain window*), the wait is
        drawn from the bottom step and the schedule does not climb.
        """
        self._state = self._advance(BackoffEvent.NEXT_DELAY)
        if now is not None and self._drained_at is not None:
            if self.in_drain_window(_check_now(now)):
                return self.policy.delay(0, rng)
            self._drained_at = None  # the window is over: climb as usual from here
        delay = self.policy.delay(self._attempt, rng)
        self._attempt += 1
        return delay

    def after_drain(
        self, reconnect_after: float, rng: random.Random, now: float | None = None
    ) -> float | None:
        """The wait after the relay drained this stream (see the module's *Drain* section);
        ``None``: no hint, draw :meth:`next_delay`. Does not climb the schedule.

        With ``now``, the schedule starts again at the bottom and the drain window opens.
        """
        if now is not None:
            self._drained_at = _check_now(now)
            self._attempt = 0
        return self.policy.drain_delay(reconnect_after, rng)

    def connected(self, now: float) -> None:
        """The relay accepted the stream at ``now``. Does not reset yet: see the reset rule."""
        now = _check_now(now)
        self._state = self._advance(BackoffEvent.CONNECTED)
        self._connected_at = now
        self._drained_at = None  # back in: a later failure is a failure again

    def disconnected(self, now: float) -> bool:
        """The stream dropped at ``now``. Returns ``True`` if this reset the schedule.

        It resets when the stream stayed up for at least ``policy.reset_after_secs``.
        """
        now = _check_now(now)
        was = self._state
        self._state = self._advance(BackoffEvent.DISCONNECTED)
        started, self._connected_at = self._connected_at, None
        if (
            was is LinkState.CONNECTED
            and started is not None
            and now - started >= self.policy.reset_after_secs
        ):
            self._attempt = 0
            return True
        return False

    def reset(self) -> None:
        """Start the schedule again at the bottom (e.g. after the host owner re-enrolled)."""
        self._attempt = 0
