"""A relay's shutdown drain: every daemon told when (and where) to come back, the store
released as soon as no stream can touch it, the ``Drain`` writes finished after that.

At 10k streams the writes themselves take the relay seconds (one grpc.aio write and one
call ending each); a successor taking over the data dir need not wait for them, only for
the store. The order is:

1. :meth:`Drain.begin`: each stream's ``Drain`` is decided (the core's ``drain_plan``) and
   its reader stopped. Streams with commands in flight get theirs written at once and are
   waited for (their results are stored here), as are control streams; unattested ones
   are refused. Idle streams hold theirs while no stream needs the store, so the
   relay's last store work (a few awaits) does not queue behind 10k writes in the loop.
2. the relay closes its store and hands the data dir over;
3. :meth:`Drain.finish`: the held ``Drain`` writes go out, bounded by the grace or the
   plan's last slot, whichever is later (:func:`write_bound`).

A hint counts from the drain's start, not from its write (``hint_at``), so a stream
written last still comes back at its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection

from aegis_edge_core.drain import DEFAULT_FIRST_AFTER, DEFAULT_MAX_SPREAD, drain_plan
from aegis_edge_relay import jsonlog
from aegis_edge_relay.state import StreamHandle

__all__ = ["Drain", "write_bound"]

SHUTTING_DOWN = "relay shutting down"


class Drain:
    """One shutdown drain of a relay's streams (see the module)."""

    def __init__(self, *, grace: float, attest_rate: float, now: Callable[[], float]) -> None:
        self._grace = grace
        self._rate = attest_rate
        self._now = now
        self._started = 0.0
        self._total = 0
        self._spread = 0.0
        self._last_slot = 0.0
        self._targets: tuple[str, ...] = ()
        self._cut = 0
        self._held: list[StreamHandle] = []

    async def begin(
        self,
        streams: Collection[StreamHandle],
        unattested: Collection[StreamHandle],
        targets: tuple[str, ...],
    ) -> None:
        """Decide every ``Drain``; return once no stream can touch the store (bounded by
        the grace). ``streams`` is the live set: it shrinks as calls end."""
        self._started = started = time.monotonic()
        self._total = len(streams)
        self._targets = targets
        daemons = [h for h in streams if h.attested and not h.control]
        # Each stream its own time to come back (and, in a cluster, another relay to come
        # back to), so the taker sees them at the rate it attests instead of all at once.
        plan = drain_plan(len(daemons), attest_rate=self._rate, targets=targets)
        self._spread = plan[-1].reconnect_after_secs - plan[0].reconnect_after_secs if plan else 0
        self._last_slot = plan[-1].reconnect_after_secs if plan else 0.0
        for handle, slot in zip(daemons, plan, strict=True):
            with contextlib.suppress(Exception):
                handle.session.drain(
                    SHUTTING_DOWN,
                    reconnect_after_secs=slot.reconnect_after_secs,
                    relay_endpoint=slot.relay_endpoint,
                )
                handle.drain_due = started + slot.reconnect_after_secs
                if handle.session.in_flight:
                    handle.flush()  # it finishes what runs, then hangs up
                else:
                    # Nothing to wait for: the relay ends the call after the Drain (status
                    # OK) rather than wait for the daemon to hang up.
                    handle.stop_reading()
                    self._held.append(handle)
        now = self._now()
        for handle in list(unattested):
            # Mid-handshake: it would attest to a relay about to close its store.
            handle.refuse("unavailable", SHUTTING_DOWN, now)
        if not any(not h.closing for h in streams):
            return
        # Some need the store a while longer: the fleet's Drains go out meanwhile.
        self._release()
        deadline = started + self._grace
        while any(not h.closing for h in streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        now = self._now()
        for handle in list(streams):
            if not handle.closing:
                self._cut += 1
                handle.refuse("unavailable", SHUTTING_DOWN, now)

    def _release(self) -> None:
        held, self._held = self._held, []
        for handle in held:
            handle.end()

    async def finish(self, streams: Collection[StreamHandle]) -> None:
        """Write the held ``Drain``s and wait until every call has ended, up to the end of
        the grace or the plan's last slot, whichever is later; cut what is left. Logs the
        one ``relay.drained`` line.

        The grace bounds waiting for daemons; these are the relay's own writes, and one
        written late (it still counts from the drain's start) beats a cut stream, which
        retries on its ladder together with every other stream cut at that moment. The
        store is closed by now, so a successor does not wait for them."""
        self._release()
        deadline = self._started + max(self._grace, self._last_slot)
        while streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = list(streams)
        now = self._now()
        for handle in cut:
            handle.refuse("unavailable", SHUTTING_DOWN, now)
        jsonlog.log(
            "info",
            "relay.drained",
            streams=self._total,
            spread_secs=round(self._spread, 3),
            to=list(self._targets),
            cut_at_grace=self._cut + len(cut),
            seconds=round(time.monotonic() - self._started, 3),
        )


def write_bound(grace: float) -> float:
    """The longest a drain may last from its start: its writes may run to the plan's last
    slot (:meth:`Drain.finish`), at most ``first_after + max_spread`` of the core's plan.
    The gRPC server's own stop grace must not cut them before that."""
    return max(grace, DEFAULT_FIRST_AFTER + DEFAULT_MAX_SPREAD)
