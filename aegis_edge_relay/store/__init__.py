"""The relay's persistent state: the :class:`Store` interface (``base``), its SQLite
implementation (``sqlite``, the embedded default) and the thread that runs store calls off
the event loop (``worker``). Moving past one relay adds a PostgreSQL implementation beside
SQLite; nothing outside this package knows which one the relay has.
"""

from aegis_edge_relay.store.base import (
    CommandRow,
    FleetRunRow,
    GroupExists,
    GroupRow,
    NodeRecord,
    Store,
    StoreError,
    StoreUnavailable,
    TokenAlreadyRedeemed,
)
from aegis_edge_relay.store.sqlite import SCHEMA_VERSION, SQLiteStore
from aegis_edge_relay.store.worker import StoreWorker

__all__ = [
    "SCHEMA_VERSION",
    "CommandRow",
    "FleetRunRow",
    "GroupExists",
    "GroupRow",
    "NodeRecord",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoreWorker",
    "TokenAlreadyRedeemed",
]
