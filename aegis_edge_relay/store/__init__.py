"""The relay's persistent state: the :class:`Store` interface (``base``), its SQLite
implementation (``sqlite``, the embedded default), the PostgreSQL one (``postgres``) -- each
joined from the same parts: ``*_base`` (connection, migrations runner, transactions),
``*_nodes``, ``*_runs`` and ``*_cluster`` (the queries by responsibility) -- the
one function that picks between them from a URL (``factory.open_store``) and the thread that
runs store calls off the event loop (``worker``). Nothing outside this package knows which
store the relay has.
"""

from aegis_edge_relay.store.base import (
    NODES_CHANGED,
    ROUTED_OUTPUT_ROWS,
    RUN_CANCELS,
    CommandRow,
    ConsoleSecret,
    FleetRunRow,
    GroupExists,
    GroupRow,
    Listener,
    NodeFeed,
    NodeRecord,
    RoutedCommand,
    RoutedOutput,
    Store,
    StoreError,
    StoreUnavailable,
    TokenAlreadyRedeemed,
    answered_run,
    cancel_answered,
    relay_channel,
)
from aegis_edge_relay.store.factory import STORE_FILE, open_store
from aegis_edge_relay.store.postgres import PostgresStore, redact_url
from aegis_edge_relay.store.sqlite import SCHEMA_VERSION, SQLiteStore
from aegis_edge_relay.store.worker import StoreWorker

__all__ = [
    "NODES_CHANGED",
    "ROUTED_OUTPUT_ROWS",
    "RUN_CANCELS",
    "SCHEMA_VERSION",
    "STORE_FILE",
    "CommandRow",
    "ConsoleSecret",
    "FleetRunRow",
    "GroupExists",
    "GroupRow",
    "Listener",
    "NodeFeed",
    "NodeRecord",
    "PostgresStore",
    "RoutedCommand",
    "RoutedOutput",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoreWorker",
    "TokenAlreadyRedeemed",
    "answered_run",
    "cancel_answered",
    "open_store",
    "redact_url",
    "relay_channel",
]
