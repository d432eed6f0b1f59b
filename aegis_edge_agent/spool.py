"""The result spool: results finished but not yet acknowledged by a relay.

A result stays here, in memory and in ``results.spool``, from the moment its call finishes
until some stream's ``ResultAck`` names it -- across dropped streams and daemon restarts.
"""

from __future__ import annotations

from aegis_edge_agent.logs import EventLog
from aegis_edge_agent.statedir import StateDir
from aegis_edge_core.wire import stream_pb2

__all__ = ["ResultSpool"]


class ResultSpool:
    def __init__(self, state: StateDir, *, log: EventLog) -> None:
        self._state = state
        self._log = log
        self.results: dict[str, stream_pb2.CommandResult] = {}

    def __len__(self) -> int:
        return len(self.results)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self.results

    def get(self, command_id: str) -> stream_pb2.CommandResult | None:
        return self.results.get(command_id)

    def pending(self) -> list[stream_pb2.CommandResult]:
        return list(self.results.values())

    def load(self) -> None:
        """Take over what an earlier run left; a damaged record is skipped and logged."""
        results, problems = self._state.load_spool()
        for problem in problems:
            self._log.warning("spool_record_skipped", problem=problem)
        for result in results:
            self.results[result.command_id] = result
        if results:
            self._log.info("spool_loaded", pending_results=len(results))

    def keep(self, result: stream_pb2.CommandResult) -> None:
        self.results[result.command_id] = result
        self._write()

    def ack(self, command_id: str) -> bool:
        """Forget an acknowledged result; False if it was not (or no longer) here."""
        if self.results.pop(command_id, None) is None:
            return False
        self._write()
        return True

    def _write(self) -> None:
        try:
            self._state.write_spool(self.results.values())
        except OSError as err:
            self._log.error("spool_write_failed", error=str(err))
