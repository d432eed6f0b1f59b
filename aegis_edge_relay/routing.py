"""Routing through the store: the cluster half of command delivery.

The dispatcher sends a command for a node another relay holds as a ``routed_commands`` row
(:meth:`~.dispatcher.Dispatcher.send`). Everything after that is here: the holder takes
the rows queued for it and delivers them on its streams, passes their cancels on, and
reports each end back; the coordinator collects those ends (from ``commands``, where the
holder wrote them) and finishes its pending commands through the dispatcher, as if the
result had come over its own stream. Live output of a routed run command takes the same
way back (``routed_output`` rows, capped per command: the oldest go first, and the bytes
lost are reported to the watchers as the single relay reports its own drops).
:meth:`Router.pump` does one round of all of it, on a store notification or at the
periodic sweep; :meth:`Router.holders_lost` ends what a relay that went away still owed.

On a store that is not shared nothing is ever routed, and this part idles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from aegis_edge_core.fleet import TargetOutcome
from aegis_edge_core.session import OutputReceived
from aegis_edge_relay.dispatcher import CommandEnd, Dispatcher, Listener, PendingCommand
from aegis_edge_relay.groupcommit import GroupCommit
from aegis_edge_relay.store import RoutedCommand, RoutedOutput

__all__ = ["Router"]


class Router:
    """Commands this relay delivers for others, and ends of those it routed elsewhere."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._db = dispatcher.db
        self.fleet = dispatcher.fleet
        self._output_log: GroupCommit[RoutedOutput, None] = GroupCommit(
            self._db, self._db.store.route_output
        )
        self._output_seq: dict[str, int] = {}
        self._output_written: dict[str, asyncio.Task[None]] = {}
        """The last output write of each routed command delivered here: its end waits for
        it (writes commit in order), so the end never overtakes its output."""

    async def pump(self) -> None:
        """Deliver the commands routed to this relay, pass on their cancels, and collect
        the results of the commands this relay routed elsewhere (and of adopted ones,
        which may have ended where no notification reaches this relay)."""
        db, me = self._db, self.fleet.cluster.relay_id
        for row in await db.call(db.store.take_routed, me):
            await self._deliver(row)
        for command_id, reason in await db.call(db.store.take_cancels, me):
            self.dispatcher.cancel_command(command_id, reason)
        ended = await db.call(db.store.take_routed_results, me)
        # After the ends: a command's output was written before its end, so all of it is
        # here now, and it reaches the watchers before the command's end does.
        for chunk in await db.call(db.store.take_routed_output, me):
            self._output_arrived(chunk)
        for command_id in ended:
            await self._collect(command_id)
        for pending in [p for p in self.dispatcher.pending.values() if p.adopted]:
            await self._collect(pending.command_id)

    def adopt(
        self,
        *,
        command_id: str,
        node_id: str,
        tenant_id: str,
        tool: str,
        fleet_command_id: str,
        dispatched_at: float,
        holder: str,
        listener: Listener,
    ) -> None:
        """Wait for a command a run's previous coordinator sent (this relay took the run
        over): its end reaches ``listener`` as if this relay had sent it."""
        pending = self.dispatcher.pending
        mine = pending.get(command_id)
        if mine is not None:
            # This relay holds the node's stream and delivered it: end both ways.
            routed_back = mine.listener

            async def both(end: CommandEnd) -> None:
                if routed_back is not None:
                    await routed_back(end)
                await listener(end)

            mine.listener = both
            return
        pending[command_id] = PendingCommand(
            command_id=command_id,
            node_id=node_id,
            tenant_id=tenant_id,
            tool=tool,
            fleet_command_id=fleet_command_id,
            dispatched_at=dispatched_at,
            listener=listener,
            routed_to=holder,
            adopted=True,
        )

    async def _deliver(self, row: RoutedCommand) -> None:
        """A command another relay routed here, for a node whose stream this relay holds.
        The store handed it over once (queued -> sent), and the daemon answers a repeated
        ``command_id`` without running it again: a tool never runs twice."""
        dispatcher = self.dispatcher
        pending = PendingCommand(
            command_id=row.command_id,
            node_id=row.node_id,
            tenant_id=row.tenant_id,
            tool=row.tool,
            fleet_command_id=row.fleet_command_id,
            dispatched_at=row.created_at,
            listener=self._routed_back,
            output=self._output_back if row.fleet_command_id else None,
            log_level="debug",
        )
        dispatcher.pending[row.command_id] = pending
        handle = self.fleet.streams.get(row.node_id)
        if handle is None or handle.closing:
            await dispatcher.disconnected(
                pending, "the daemon's stream moved away before the command reached it"
            )
            return
        handle.session.send_command(
            command_id=row.command_id,
            tool=row.tool,
            args_json=row.args_json,
            fleet_command_id=row.fleet_command_id,
            deadline=row.deadline,
            timeout_secs=row.timeout_secs,
            traceparent="",
            tracestate="",
        )
        handle.flush()
        if row.cancel:
            dispatcher.cancel_command(row.command_id, row.cancel)

    async def _routed_back(self, end: CommandEnd) -> None:
        """The end of a routed command is in ``commands``: tell its coordinator."""
        self._output_seq.pop(end.command_id, None)
        written = self._output_written.pop(end.command_id, None)
        if written is not None:
            await asyncio.wait([written])
        await self._db.call(self._db.store.finish_routed, end.command_id)

    def _output_back(self, pending: PendingCommand, event: OutputReceived, lost: int) -> None:
        """Live output of a run's command delivered here: to its coordinator, through the
        store (chunks that arrive while a batch is written go in the next one)."""
        seq = self._output_seq.get(pending.command_id, 0) + 1
        self._output_seq[pending.command_id] = seq
        chunk = RoutedOutput(
            command_id=pending.command_id, seq=seq, stdout=event.stdout, stderr=event.stderr
        )
        self._output_written[pending.command_id] = self.dispatcher.spawn(
            self._output_log.submit(chunk)
        )

    def _output_arrived(self, chunk: RoutedOutput) -> None:
        """Output of a command this relay routed elsewhere, as if its stream were here."""
        pending = self.dispatcher.pending.get(chunk.command_id)
        if pending is None or not pending.routed_to:
            return  # ended already (its holder was lost): nobody watches it any more
        event = OutputReceived(
            command_id=chunk.command_id,
            seq=chunk.seq,
            stdout=chunk.stdout,
            stderr=chunk.stderr,
            known=True,
        )
        self.dispatcher.on_output(pending.node_id, event, lost_before=chunk.dropped_before)

    async def _collect(self, command_id: str) -> None:
        pending = self.dispatcher.pending.get(command_id)
        if pending is None or not pending.routed_to:
            return  # already ended here (its holder was lost): history has the result
        row = await self._db.call(self._db.store.get_command, command_id)
        if row is None or not row.outcome:
            return
        await self.dispatcher.finish(
            pending,
            TargetOutcome(row.outcome),
            row.finished_at or self.dispatcher.now(),
            exit_code=row.exit_code,
            error_message=row.error,
            stdout=row.stdout_tail,
            stderr=row.stderr_tail,
            result_json=row.result_json,
        )

    def holders_lost(self, live: Collection[str]) -> None:
        """Commands routed to a relay whose lease lapsed end ``edge_disconnected``, unless
        their end reached ``commands`` before it went (a relay that stopped gracefully
        let its daemons finish); a later result, through any relay, still lands in
        history."""
        for pending in list(self.dispatcher.pending.values()):
            if pending.routed_to and pending.routed_to not in live:
                self.dispatcher.spawn(self._holder_lost(pending))

    async def _holder_lost(self, pending: PendingCommand) -> None:
        await self._collect(pending.command_id)
        await self.dispatcher.disconnected(
            pending, "the relay holding the daemon's stream went away"
        )
