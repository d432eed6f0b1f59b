"""When each drained daemon comes back, and where: the relay's side of a restart.

A relay that shuts down sends every daemon a ``Drain`` with ``reconnect_after_secs``. With
one value for all of them, every daemon of the relay returns in the same second (the
daemon's jitter spreads them over half a second) and the relay that takes them -- the same
relay restarted, or the other relays of a cluster -- gets 10k TLS handshakes and
attestations at once. It can take only so many per second (its *attestation rate*: two
Ed25519 verifications, a TLS handshake and four stream messages each; measured about
500 per second on two shared cores); the rest queue in its accept backlog or time out
and come back on their backoff ladder, which is the storm.

:func:`drain_plan` gives each stream its own slot instead: stream ``i`` of ``count`` comes
back ``first_after + spread * i / count`` seconds after the drain, where ``spread`` is the
time the targets need to take all of them at ``attest_rate`` each, capped at
``max_spread``. In a cluster the streams go round-robin to the other relays (``targets``),
so each of ``k`` relays sees one arrival every ``1 / attest_rate`` seconds and the whole
fleet is back ``k`` times sooner; with no targets every stream comes back to the endpoint it
knows (the relay itself, restarted).

Pure: the relay passes the count, the rate and the endpoints, and sends what comes back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import attrs

__all__ = [
    "DEFAULT_ATTEST_RATE",
    "DEFAULT_FIRST_AFTER",
    "DEFAULT_MAX_SPREAD",
    "DrainSlot",
    "back_within",
    "drain_plan",
    "hint_at",
]

DEFAULT_ATTEST_RATE: Final = 500.0
"""Attestations per second one relay takes while a fleet comes back: what
``benchmarks/scale.py`` measured a pressed relay taking at 10k daemons on two cores shared
with the load generators (528/s; 500/s beat both 400/s and 600/s in one 5k take-over run
on a loaded machine). Too low a rate leaves the taker idle between arrivals; too high
queues them in its backlog, which costs handshake time but no refusal."""

DEFAULT_FIRST_AFTER: Final = 1.0
"""The earliest slot, in seconds: the hint every daemon got before slots existed."""

DEFAULT_MAX_SPREAD: Final = 60.0
"""The latest slot is at most this long after the first: a fleet too large for the rate
comes back faster than the rate allows rather than waiting longer than the daemon's
longest backoff step."""


@attrs.frozen
class DrainSlot:
    """One stream's part of a drain: come back after ``reconnect_after_secs``, at
    ``relay_endpoint`` (empty: the endpoint the daemon knows)."""

    reconnect_after_secs: float
    relay_endpoint: str = ""


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return float(value)


def drain_plan(
    count: int,
    *,
    attest_rate: float = DEFAULT_ATTEST_RATE,
    targets: Sequence[str] = (),
    first_after: float = DEFAULT_FIRST_AFTER,
    max_spread: float = DEFAULT_MAX_SPREAD,
) -> list[DrainSlot]:
    """A slot for each of ``count`` drained streams, in stream order (see the module).

    Deterministic given its arguments; slots never decrease and all lie in
    ``[first_after, first_after + max_spread]``. Raises ValueError on a negative count, a
    rate that is not a positive number, or negative or non-finite seconds.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if (
        isinstance(attest_rate, bool)
        or not isinstance(attest_rate, int | float)
        or not math.isfinite(attest_rate)
        or attest_rate <= 0
    ):
        raise ValueError(f"attest_rate must be a positive number per second, got {attest_rate!r}")
    first = _seconds("first_after", first_after)
    cap = _seconds("max_spread", max_spread)
    if isinstance(targets, str):
        raise TypeError("targets must be a sequence of host:port, not a string")
    where = tuple(targets) or ("",)
    spread = min(count / (attest_rate * len(where)), cap)
    return [
        DrainSlot(
            reconnect_after_secs=first + spread * i / count,
            relay_endpoint=where[i % len(where)],
        )
        for i in range(count)
    ]


def back_within(
    count: int,
    *,
    attest_rate: float = DEFAULT_ATTEST_RATE,
    first_after: float = DEFAULT_FIRST_AFTER,
    max_spread: float = DEFAULT_MAX_SPREAD,
) -> float:
    """Seconds after a drain of at most ``count`` streams (back to the relay itself) by
    which each of those daemons is due back: the last slot of :func:`drain_plan`, plus one
    more first step for the daemon's jitter (at most half a first step) and its handshake.

    A successor that resumes the drained relay's fleet runs waits this long for a target's
    daemon before it counts the target ``edge_disconnected``: without the restart the
    daemon would have been there. Same arguments and errors as :func:`drain_plan`.
    """
    plan = drain_plan(
        max(count, 1), attest_rate=attest_rate, first_after=first_after, max_spread=max_spread
    )
    return plan[-1].reconnect_after_secs + _seconds("first_after", first_after)


def hint_at(due: float, now: float, *, first_after: float = DEFAULT_FIRST_AFTER) -> float:
    """The ``reconnect_after_secs`` to write at ``now`` for a slot due at ``due`` (both on
    the relay's clock: the drain's start plus the slot's seconds).

    A plan's slots count from the drain's start, but 10k ``Drain`` writes take the relay
    seconds; a hint fixed at the start would push the stream written last that much past
    its slot, and the fleet would come back slower than the rate. Never less than
    ``first_after``, the plan's first slot (the taker's time to be ready): while the
    writes go out faster than the plan's rate that bound never moves a slot. Raises
    ValueError on non-finite times or a negative ``first_after``.
    """
    if not (math.isfinite(due) and math.isfinite(now)):
        raise ValueError(f"due and now must be finite, got {due!r} and {now!r}")
    return max(_seconds("first_after", first_after), due - now)
