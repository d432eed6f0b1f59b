"""Store calls off the event loop: one dedicated thread per store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, ParamSpec, TypeVar

from aegis_edge_relay import jsonlog
from aegis_edge_relay.store.base import Store, StoreError, StoreUnavailable

__all__ = ["StoreWorker"]


P = ParamSpec("P")
T = TypeVar("T")

PERSIST_PATIENCE: Final = 120.0
"""How long :meth:`StoreWorker.persist` keeps retrying a write the store refuses as
unavailable: long enough for a database server restart, short enough that a dead store
ends the wait with an error rather than never."""

STOP_PATIENCE: Final = 5.0
"""How long after :meth:`StoreWorker.stopping` every :meth:`StoreWorker.persist` may still
retry: a database down as the relay stops must not hold its exit for
:data:`PERSIST_PATIENCE` per write (a run's final record, a batch of results...), and what the
relay gives up on it logs (``store.write_abandoned``)."""

LOGGED_IDS: Final = 100
"""At most this many ids of one abandoned write are logged (a batch may name 10k commands)."""


class StoreWorker:
    """Runs store calls on one dedicated thread, so async code never blocks on the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aegis-store")
        self._stop_by = float("inf")
        """When, once the relay is stopping, every persist gives up (monotonic clock)."""

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
        growing pause, up to :data:`PERSIST_PATIENCE` (:data:`STOP_PATIENCE` from
        :meth:`stopping` on), then log what is lost and raise the last error."""
        give_up = time.monotonic() + PERSIST_PATIENCE
        pause = 0.2
        while True:
            try:
                return await self.call(fn, *args, **kwargs)
            except StoreUnavailable as err:
                if time.monotonic() + pause > min(give_up, self._stop_by):
                    _abandoned(fn, args, err, stopping=self._stop_by < give_up)
                    raise
                jsonlog.log("warning", "store.write_retrying", error=str(err), after=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    def stopping(self) -> None:
        """The relay is stopping: persists, those retrying now and those to come, give up
        :data:`STOP_PATIENCE` from now."""
        self._stop_by = min(self._stop_by, time.monotonic() + STOP_PATIENCE)

    def close(self) -> None:
        self._pool.submit(self.store.close).result()
        self._pool.shutdown(wait=True)


def _abandoned(
    fn: Callable[..., Any], args: tuple[Any, ...], err: StoreUnavailable, *, stopping: bool
) -> None:
    """Log a write given up on: the store function and the ids of the rows it carried,
    never their contents (results and arguments may hold secrets)."""
    ids: dict[str, list[str]] = {}
    for row in _rows(args):
        for name in ("command_id", "fleet_command_id"):  # a command's row names its run too
            value = getattr(row, name, None)
            if isinstance(value, str) and value:
                ids.setdefault(name, []).append(value)
                break
    fields: dict[str, Any] = {}
    for name, values in ids.items():
        fields[f"{name}s"] = values[:LOGGED_IDS]
        if len(values) > LOGGED_IDS:
            fields[f"{name}s_omitted"] = len(values) - LOGGED_IDS
    jsonlog.log(
        "error",
        "store.write_abandoned",
        write=getattr(fn, "__name__", type(fn).__name__),
        relay_stopping=stopping,
        error=str(err),
        **fields,
    )


def _rows(args: Iterable[Any]) -> Iterable[Any]:
    for arg in args:
        if isinstance(arg, list | tuple):
            yield from arg
        else:
            yield arg
