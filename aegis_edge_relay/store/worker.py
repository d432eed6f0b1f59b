"""Store calls off the event loop: one dedicated thread per store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, ParamSpec, TypeVar

from aegis_edge_relay import jsonlog
from aegis_edge_relay.store.base import Store, StoreError, StoreUnavailable

__all__ = ["StoreWorker"]


P = ParamSpec("P")
T = TypeVar("T")

PERSIST_PATIENCE: Final = 120.0
"""How long :meth:`StoreWorker.persist` keeps retrying a write the store refuses as
unavailable: long enough for a database server restart, short enough that a dead store
ends the wait with an error rather than never."""


class StoreWorker:
    """Runs store calls on one dedicated thread, so async code never blocks on the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aegis-store")

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the store thread; database failures become :class:`StoreUnavailable`."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except StoreError:
                raise
            except Exception as err:
                mapped = self.store.unavailable(err)
                if mapped is None:
                    raise
                raise mapped from err

        return await loop.run_in_executor(self._pool, run)

    async def persist(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`call` for what the relay already holds in memory and must not drop (results,
        dispatch rows, a run's final record): while the store is unavailable, retry with a
        growing pause, up to :data:`PERSIST_PATIENCE`, then raise the last error."""
        give_up = time.monotonic() + PERSIST_PATIENCE
        pause = 0.2
        while True:
            try:
                return await self.call(fn, *args, **kwargs)
            except StoreUnavailable as err:
                if time.monotonic() + pause > give_up:
                    raise
                jsonlog.log("warning", "store.write_retrying", error=str(err), after=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    def close(self) -> None:
        self._pool.submit(self.store.close).result()
        self._pool.shutdown(wait=True)
