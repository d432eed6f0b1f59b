"""Rate limits for enrollment, attestation and token refresh: token buckets, injected clock.

A leaked enrollment token or a daemon stuck in a reconnect loop must not be able to keep
the relay busy verifying signatures. The relay therefore asks a :class:`KeyedLimiter`
before it does any expensive work for an attempt, once per key that applies -- the
attempt's source (peer address) and, for attestation, the node id the hello names
(an attested node's token refresh requests are limited by node id alone, with one
:class:`KeyedLimiter`):

    limits = AttemptLimits(
        per_source=KeyedLimiter(Limit.parse("20000/10s")),
        per_node=KeyedLimiter(Limit.parse("30/1m")),
    )
    decision = limits.check(now, source="127.0.0.1", node="n-1234")
    if not decision.allowed:
        refuse("rate_limited", retry_after_secs=decision.retry_after)

Semantics
---------
* A :class:`Limit` of ``N/PERIOD`` is a bucket of ``N`` tokens (the burst) refilled at
  ``N / PERIOD`` tokens per second. Every allowed attempt takes one token; a refused
  attempt takes none, so a client that keeps hammering does not push its own retry
  further out, and its ``retry_after`` is exactly when the next token will be there.
* :meth:`AttemptLimits.check` is all-or-nothing: an attempt is allowed only if *every*
  key has a token, and then one is taken from each; if any key is out, nothing is taken.
* Time is whatever the caller passes as ``now`` (seconds, one clock). A ``now`` earlier
  than one already seen is treated as the latest seen: a wall clock stepping back never
  refills a bucket and never raises.
* Memory is bounded: a :class:`KeyedLimiter` keeps at most ``max_keys`` buckets. When it
  is full it first forgets buckets that have refilled completely (they are equivalent to a
  fresh bucket, so forgetting them changes no decision), then the least recently used.

Like the rest of the core this module does no I/O and reads no clock.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Final

import attrs

from aegis_edge_core.errors import ConfigError

__all__ = [
    "ATTEST_PER_NODE",
    "ATTEST_PER_SOURCE",
    "DEFAULT_ATTEST_PER_NODE",
    "DEFAULT_ATTEST_PER_SOURCE",
    "DEFAULT_ENROLL_PER_SOURCE",
    "DEFAULT_REFRESH_PER_NODE",
    "ENROLL_PER_SOURCE",
    "REFRESH_PER_NODE",
    "AttemptLimits",
    "Decision",
    "KeyedLimiter",
    "Limit",
    "TokenBucket",
    "source_of",
]

_LIMIT_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _finite(now: float) -> float:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


@attrs.frozen
class Limit:
    """``burst`` attempts at once, refilled at ``rate`` per second. A disabled limit is
    ``None`` wherever limits are passed."""

    burst: float = attrs.field()
    rate: float = attrs.field()

    @burst.validator
    def _check_burst(self, _attr: object, value: float) -> None:
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(f"burst must be at least 1, got {value!r}")

    @rate.validator
    def _check_rate(self, _attr: object, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rate must be a positive number per second, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Limit | None:
        """``"30/1m"`` -> 30 attempts per minute (burst 30); ``"off"`` -> ``None``.

        Units: ``ms``, ``s`` (default), ``m``, ``h``; ``"5/s"`` means 5 per second.
        Raises :class:`~aegis_edge_core.errors.ConfigError` naming the problem.
        """
        if text.strip().lower() in ("off", "none", "0", "unlimited"):
            return None
        m = _LIMIT_RE.match(text)
        if m is None:
            raise ConfigError(
                f"rate limit {text!r} is not of the form N/PERIOD",
                hint="e.g. 30/1m (30 per minute), 2000/s, or off",
            )
        count = float(m.group(1))
        period = float(m.group(2) or 1) * _UNITS[m.group(3) or "s"]
        if count < 1 or period <= 0:
            raise ConfigError(
                f"rate limit {text!r}: need at least 1 attempt per a positive period",
                hint="e.g. 30/1m, or off to disable",
            )
        return cls(burst=count, rate=count / period)

    def __str__(self) -> str:
        return f"{self.burst:g}/{self.burst / self.rate:g}s"


@attrs.frozen
class Decision:
    """``allowed``; else ``retry_after`` seconds until an attempt would be allowed."""

    allowed: bool
    retry_after: float = 0.0


ALLOW: Final = Decision(True, 0.0)


@attrs.define
class TokenBucket:
    """One bucket; :meth:`full` makes one that starts full."""

    limit: Limit
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, limit: Limit, now: float) -> TokenBucket:
        return cls(limit, limit.burst, _finite(now))

    def _refill(self, now: float) -> None:
        now = _finite(now)
        if now > self.updated_at:
            self.tokens = min(
                self.limit.burst, self.tokens + (now - self.updated_at) * self.limit.rate
            )
            self.updated_at = now

    def peek(self, now: float, cost: float = 1.0) -> Decision:
        """Would ``cost`` tokens be available at ``now``? Takes nothing."""
        self._refill(now)
        if self.tokens >= cost:
            return ALLOW
        return Decision(False, (cost - self.tokens) / self.limit.rate)

    def take(self, now: float, cost: float = 1.0) -> Decision:
        """Take ``cost`` tokens if there are enough; refused attempts take nothing."""
        decision = self.peek(now, cost)
        if decision.allowed:
            self.tokens -= cost
        return decision

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.limit.burst


class KeyedLimiter:
    """One :class:`TokenBucket` per key (a peer address, a node id), bounded in number."""

    def __init__(self, limit: Limit, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._make_room(now)
            bucket = TokenBucket.full(self.limit, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
        return bucket

    def _make_room(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)

    def peek(self, key: str, now: float) -> Decision:
        return self._bucket(key, now).peek(now)

    def take(self, key: str, now: float) -> Decision:
        return self._bucket(key, now).take(now)


DEFAULT_ATTEST_PER_NODE: Final = "30/1m"
"""Per node id: a daemon in a tight loop gets one attempt every 2 s after a burst of 30."""
DEFAULT_ATTEST_PER_SOURCE: Final = "50000/10s"
"""Per peer address: generous, since many daemons may share one address (NAT, loopback
tests): a reconnect storm of 10k daemons behind one address is never refused."""
DEFAULT_ENROLL_PER_SOURCE: Final = "20000/1m"
"""Per peer address, for ``Enroll``: bounds how fast one source can try tokens."""
DEFAULT_REFRESH_PER_NODE: Final = "6/1h"
"""Per attested node, for token refreshes the daemon asks for: an honest daemon asks once
as its token nears expiry (the relay also pushes one unasked, which is not counted), so
six an hour leaves room for reconnects while a daemon asking in a loop costs the relay at
most six signatures and store writes an hour."""


def _default(text: str) -> Limit:
    limit = Limit.parse(text)
    assert limit is not None
    return limit


ATTEST_PER_NODE: Final = _default(DEFAULT_ATTEST_PER_NODE)
ATTEST_PER_SOURCE: Final = _default(DEFAULT_ATTEST_PER_SOURCE)
ENROLL_PER_SOURCE: Final = _default(DEFAULT_ENROLL_PER_SOURCE)
REFRESH_PER_NODE: Final = _default(DEFAULT_REFRESH_PER_NODE)
"""The defaults above as :class:`Limit` values."""


@attrs.define
class AttemptLimits:
    """The limits that apply to one kind of attempt; either may be ``None`` (off)."""

    per_source: KeyedLimiter | None = None
    per_node: KeyedLimiter | None = None

    def check(self, now: float, *, source: str, node: str | None = None) -> Decision:
        """Allow (taking one token from each applicable bucket) or refuse (taking none)."""
        now = _finite(now)
        keyed: list[tuple[KeyedLimiter, str]] = []
        if self.per_source is not None:
            keyed.append((self.per_source, source))
        if self.per_node is not None and node is not None:
            keyed.append((self.per_node, node))
        refusals = [d for d in (lim.peek(key, now) for lim, key in keyed) if not d.allowed]
        if refusals:
            return Decision(False, max(d.retry_after for d in refusals))
        for lim, key in keyed:
            lim.take(key, now)
        return ALLOW


def source_of(peer: str) -> str:
    """The address part of a gRPC peer string: ``"ipv4:127.0.0.1:5123"`` -> ``"127.0.0.1"``,
    ``"ipv6:[::1]:5123"`` -> ``"::1"``; anything else is returned as it is."""
    kind, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return rest
