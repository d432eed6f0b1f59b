"""The SQLite implementation of :class:`~aegis_edge_relay.store.base.Store`: the relay's
embedded default, one file in its data dir.

WAL, a versioned schema (``schema_version``, migrated on open) and ``BEGIN IMMEDIATE`` for
each change the interface says is atomic. The file and its sidecars are created owner-only.
"""

from aegis_edge_relay.store.sqlite_cluster import SQLiteCluster
from aegis_edge_relay.store.sqlite_nodes import SQLiteNodes
from aegis_edge_relay.store.sqlite_runs import SQLiteRuns
from aegis_edge_relay.store.sqlite_schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]


class SQLiteStore(SQLiteNodes, SQLiteRuns, SQLiteCluster):
    """:class:`Store` on one SQLite file in WAL mode. Use from one thread at a time."""
