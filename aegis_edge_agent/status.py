"""The daemon's ``status.json``: what ``aegis edge status`` reads while the daemon runs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.statedir import StateDir
from aegis_edge_core import __version__
from aegis_edge_core import hoststate as hs

__all__ = ["StatusBoard"]


class StatusBoard:
    """The fields of the daemon's status; every :meth:`set` rewrites the file with the
    counts of running calls and unacknowledged results as they are at that moment."""

    def __init__(
        self,
        state: StateDir,
        *,
        log: EventLog,
        inflight: Callable[[], int],
        pending_results: Callable[[], int],
    ) -> None:
        self._state = state
        self._log = log
        self._inflight = inflight
        self._pending_results = pending_results
        self.fields: dict[str, Any] = {
            "state": hs.ConnectionState.STARTING,
            "pid": os.getpid(),
            "relay": "",
            "agent_version": __version__,
        }
        self.connected = asyncio.Event()
        """Set the first time the state is CONNECTED: the daemon's start-up is over."""

    def note(self, **changes: Any) -> None:
        """Change fields without writing: the next :meth:`set` carries them."""
        self.fields.update(changes)

    def set(self, **changes: Any) -> None:
        self.fields.update(changes)
        self.fields["updated_at"] = time.time()
        self.fields["inflight"] = self._inflight()
        self.fields["pending_results"] = self._pending_results()
        if self.fields["state"] == hs.ConnectionState.CONNECTED:
            self.connected.set()
        try:
            self._state.write_status(hs.DaemonStatus(**self.fields))
        except OSError as err:
            self._log.warning("status_write_failed", error=str(err))
