"""Which relay a daemon dials: its cluster's endpoints, in order.

A cluster's enrollment tokens carry every relay endpoint (``rels``) beside the one the
token was issued at (``rel``); ``node.json`` keeps both. A daemon stays with the relay it
last attested at while it works, and after each connection that ends or fails moves on to
the next endpoint, under the same backoff, so a relay that is gone costs one backoff step,
not a wait for it to return. One endpoint (a single relay, or one name behind a TCP load
balancer) gives the old behaviour exactly: always that one.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["dial_order", "endpoint_list"]


def endpoint_list(primary: str, others: Iterable[str]) -> tuple[str, ...]:
    """``primary`` then ``others`` in their order, each once, empties dropped."""
    seen: dict[str, None] = {}
    for endpoint in (primary, *others):
        if endpoint and endpoint not in seen:
            seen[endpoint] = None
    return tuple(seen)


def dial_order(endpoints: tuple[str, ...], last_good: str, failures: int) -> str:
    """The endpoint to dial after ``failures`` connections ended or failed since the
    daemon last attested, at ``last_good`` (empty: never yet, start at the first).

    ``failures`` counts up from there, so a daemon walks the list round-robin from the
    relay that last worked and comes back to it after trying every other one.
    """
    if not endpoints:
        raise ValueError("a daemon needs at least one relay endpoint")
    if failures < 0:
        raise ValueError("failures counts up from 0")
    start = endpoints.index(last_good) if last_good in endpoints else 0
    return endpoints[(start + failures) % len(endpoints)]
