"""Group commit: rows that arrive while a batch is being written go into the next one.

The dispatcher's dispatch and result rows, the router's queue and output rows, and the
cluster's stream-holder rows each go through one :class:`GroupCommit`, so a fleet run's 10k
rows (or a restarted relay's 10k attestations) take a few store transactions (and hops to
the store thread), not 10k, while every caller still waits for its own rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from aegis_edge_relay.store import StoreWorker

__all__ = ["GroupCommit"]

R = TypeVar("R")
W = TypeVar("W")


class GroupCommit(Generic[R, W]):
    """Rows that arrive while a batch is being written go together into the next one: one
    store transaction (and one hop to the store thread) per batch, not per row. Each caller
    still awaits *its* rows being committed, so "persist, then send/ack" holds."""

    def __init__(
        self,
        db: StoreWorker,
        write_many: Callable[[list[R]], list[W] | None],
        *,
        persist: bool = True,
    ) -> None:
        """``persist``: retry while the store is unavailable (:meth:`StoreWorker.persist`,
        for rows the relay holds and must not drop); False fails the batch at once
        (:meth:`StoreWorker.call`), for writes the caller can answer with a refusal."""
        self.db = db
        self._write_many = write_many
        self._write = db.persist if persist else db.call
        self._queue: list[tuple[list[R], asyncio.Future[list[W | None]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, row: R) -> W | None:
        return (await self.submit_many([row]))[0]

    async def submit_many(self, rows: list[R]) -> list[W | None]:
        """Rows that go in one transaction (with whatever else is queued then)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[W | None]] = loop.create_future()
        self._queue.append((rows, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                rows = [row for group, _ in batch for row in group]
                out = await self._write(self._write_many, rows)
            except Exception as err:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            start = 0
            for group, fut in batch:
                end = start + len(group)
                if not fut.done():
                    fut.set_result(list(out[start:end]) if out is not None else [None] * len(group))
                start = end
