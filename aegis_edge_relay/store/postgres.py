"""The PostgreSQL implementation of :class:`~aegis_edge_relay.store.base.Store`: the relay's
state in a database server (``--store postgresql://...``), the ground several relays will
share.

psycopg 3 with a psycopg-pool pool: a connection the server dropped (a restart) is found by
the pool's check and replaced, so the store reconnects by itself. Every change runs as one
``SERIALIZABLE`` transaction -- the same all-or-nothing and one-at-a-time meaning as SQLite's
``BEGIN IMMEDIATE`` -- and a serialization failure or deadlock (another writer on the same
rows) reruns the transaction a bounded number of times. Reads are single autocommit
statements. Each connection carries a statement timeout, so a stuck lock or an overloaded
server turns into :class:`StoreUnavailable` instead of a store thread that never returns.
"""

from aegis_edge_relay.store.postgres_base import PostgresListener, redact_url
from aegis_edge_relay.store.postgres_cluster import PostgresCluster
from aegis_edge_relay.store.postgres_nodes import PostgresNodes
from aegis_edge_relay.store.postgres_runs import PostgresRuns

__all__ = ["PostgresListener", "PostgresStore", "redact_url"]


class PostgresStore(PostgresNodes, PostgresRuns, PostgresCluster):
    """:class:`Store` on a PostgreSQL database. Use from one thread at a time (the
    relay's store worker); the pool holds the connections."""
