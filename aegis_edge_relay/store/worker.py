"""Store calls off the event loop: one dedicated thread per store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from aegis_edge_relay.store.base import Store
from aegis_edge_relay.store.sqlite import _unavailable

__all__ = ["StoreWorker"]


P = ParamSpec("P")
T = TypeVar("T")


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
            except sqlite3.IntegrityError:
                raise
            except sqlite3.DatabaseError as err:
                raise _unavailable(err, getattr(self.store, "path", "the store")) from err

        return await loop.run_in_executor(self._pool, run)

    def close(self) -> None:
        self._pool.submit(self.store.close).result()
        self._pool.shutdown(wait=True)
