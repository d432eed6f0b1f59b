"""Routing through the store: the cluster half of command delivery.

The dispatcher sends a command for a node another relay holds as a ``routed_commands`` row
(:meth:`~.dispatcher.Dispatcher.send`). Everything after that is here: the holder takes
the rows queued for it and delivers them on its streams, passes their cancels on, and
reports each end back; the coordinator collects those ends (from ``commands``, where the
holder wrote them) and finishes its pending commands through the dispatcher, as if the
result had come over its own stream. :meth:`Router.pump` does one round of all of it, on a
store notification or at the periodic sweep; :meth:`Router.holders_lost` ends what a relay
that went away still owed.

On a store that is not shared nothing is ever routed, and this part idles.
"""

from __future__ import annotations

from collections.abc import Collection

from aegis_edge_core.fleet import TargetOutcome
from aegis_edge_relay.dispatcher import CommandEnd, Dispatcher, Listener, PendingCommand
from aegis_edge_relay.store import RoutedCommand

__all__ = ["Router"]


class Router:
    """Commands this relay delivers for others, and ends of those it routed elsewhere."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._db = dispatcher.db
        self.fleet = dispatcher.fleet

    async def pump(self) -> None:
        """Deliver the commands routed to this relay, pass on their cancels, and collect
        the results of the commands this relay routed elsewhere (and of adopted ones,
        which may have ended where no notification reaches this relay)."""
        db, me = self._db, self.fleet.cluster.relay_id
        for row in await db.call(db.store.take_routed, me):
            await self._deliver(row)
        for command_id, reason in await db.call(db.store.take_cancels, me):
            self.dispatcher.cancel_command(command_id, reason)
        for command_id in await db.call(db.store.take_routed_results, me):
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
        await self._db.call(self._db.store.finish_routed, end.command_id)

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
