"""The SQLite schema as numbered migrations; ``SQLiteStore`` applies the missing ones on
open, each in one transaction with its ``schema_version`` row. A migration, once released,
is never edited: a change is a new number."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 8

_MIGRATIONS: Final[Mapping[int, str]] = {
    1: """
    CREATE TABLE nodes (
        node_id           TEXT PRIMARY KEY,
        tenant_id         TEXT NOT NULL,
        public_key        BLOB NOT NULL,
        key_thumbprint    TEXT NOT NULL,
        status            TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        revoked_reason    TEXT NOT NULL DEFAULT '',
        revoked_at        REAL,
        enrolled_at       REAL NOT NULL,
        last_heartbeat_at REAL,
        capabilities      TEXT NOT NULL DEFAULT '{}',
        tags              TEXT NOT NULL DEFAULT '[]',
        token_jti         TEXT NOT NULL DEFAULT '',
        token_expires_at  REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX nodes_tenant ON nodes (tenant_id);
    CREATE TABLE enrollment_tokens (
        jti         TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        redeemed_at REAL NOT NULL,
        expires_at  REAL NOT NULL
    );
    CREATE TABLE revocations (
        kind        TEXT NOT NULL CHECK (kind IN ('token', 'key')),
        id          TEXT NOT NULL,
        prune_after REAL,
        revoked_at  REAL NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE deleted_tenants (
        tenant_id  TEXT PRIMARY KEY,
        deleted_at REAL NOT NULL
    );
    CREATE TABLE commands (
        command_id       TEXT PRIMARY KEY,
        node_id          TEXT NOT NULL,
        tenant_id        TEXT NOT NULL,
        fleet_command_id TEXT NOT NULL DEFAULT '',
        tool             TEXT NOT NULL,
        dispatched_at    REAL NOT NULL,
        finished_at      REAL,
        outcome          TEXT NOT NULL DEFAULT '',
        exit_code        INTEGER,
        error            TEXT NOT NULL DEFAULT '',
        stdout_tail      BLOB NOT NULL DEFAULT x'',
        stderr_tail      BLOB NOT NULL DEFAULT x''
    );
    CREATE INDEX commands_node ON commands (node_id, dispatched_at DESC);
    CREATE TABLE fleet_runs (
        fleet_command_id TEXT PRIMARY KEY,
        tenant_id        TEXT NOT NULL DEFAULT '',
        scope            TEXT,
        spec             TEXT NOT NULL,
        outcome          TEXT NOT NULL,
        created_at       REAL NOT NULL,
        finished_at      REAL,
        created_by       TEXT NOT NULL,
        record           TEXT NOT NULL,
        trace_id         TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX fleet_runs_created ON fleet_runs (created_at DESC);
    """,
    2: """
    CREATE TABLE groups (
        tenant_id  TEXT NOT NULL,
        name       TEXT NOT NULL,
        selector   TEXT NOT NULL,
        pinned     TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, name)
    );
    """,
    # Stored arguments (NULL: a run from before they were kept), the names of its secret
    # arguments (never their values) and the run it reran.
    3: """
    ALTER TABLE fleet_runs ADD COLUMN args_json TEXT;
    ALTER TABLE fleet_runs ADD COLUMN secret_keys TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE fleet_runs ADD COLUMN rerun_of TEXT NOT NULL DEFAULT ''
    """,
    # Issue 14: the tool's structured result, for fleet show and edge show --history.
    4: """
    ALTER TABLE commands ADD COLUMN result_json TEXT NOT NULL DEFAULT ''
    """,  # Issue 18, cluster identity: each relay's published token-signing key (by kid), the
    # cluster (its CA certificate, never the CA key) and each relay's advertised endpoint.
    5: """
    CREATE TABLE relay_keys (
        kid        TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE clusters (
        name       TEXT PRIMARY KEY,
        ca_cert    TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE relay_endpoints (
        relay_id   TEXT PRIMARY KEY,
        cluster    TEXT NOT NULL,
        endpoint   TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # Issue 18: the cluster. Each relay's lease; which relay holds each node's stream
    # (relay_id '' once released; the row stays, so generations only grow); commands for a
    # node held by another relay, queued for it (the result goes to `commands` as ever);
    # the coordinator lease of each unfinished fleet run.
    6: """
    CREATE TABLE relay_leases (
        relay_id   TEXT PRIMARY KEY,
        endpoint   TEXT NOT NULL DEFAULT '',
        expires_at REAL NOT NULL
    );
    CREATE TABLE stream_holders (
        node_id    TEXT PRIMARY KEY,
        relay_id   TEXT NOT NULL DEFAULT '',
        generation INTEGER NOT NULL,
        status     TEXT NOT NULL,
        since      REAL NOT NULL
    );
    CREATE INDEX stream_holders_relay ON stream_holders (relay_id);
    CREATE TABLE routed_commands (
        command_id       TEXT PRIMARY KEY,
        node_id          TEXT NOT NULL,
        tenant_id        TEXT NOT NULL,
        holder           TEXT NOT NULL,
        coordinator      TEXT NOT NULL,
        tool             TEXT NOT NULL,
        args_json        TEXT NOT NULL,
        fleet_command_id TEXT NOT NULL DEFAULT '',
        deadline         REAL NOT NULL DEFAULT 0,
        timeout_secs     REAL NOT NULL DEFAULT 0,
        state            TEXT NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'sent', 'done', 'collected')),
        cancel           TEXT NOT NULL DEFAULT '',
        cancel_sent      INTEGER NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL
    );
    CREATE INDEX routed_commands_holder ON routed_commands (holder, state);
    CREATE INDEX routed_commands_coordinator ON routed_commands (coordinator, state);
    CREATE TABLE run_leases (
        fleet_command_id TEXT PRIMARY KEY,
        coordinator      TEXT NOT NULL,
        expires_at       REAL NOT NULL
    )
    """,
    # Issue 18, routing gaps: live output of routed commands waiting for their coordinator
    # (capped per command), and cancels of fleet runs asked for through a
    # relay that does not coordinate them (``taken_by``: the coordinator that acted on it;
    # ``answer``: the run as it saw it then, a serialized FleetRun).
    7: """
    CREATE TABLE routed_output (
        command_id     TEXT NOT NULL,
        seq            INTEGER NOT NULL,
        stdout         BLOB NOT NULL,
        stderr         BLOB NOT NULL,
        dropped_before INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (command_id, seq)
    );
    CREATE TABLE run_cancels (
        fleet_command_id TEXT PRIMARY KEY,
        reason           TEXT NOT NULL,
        requested_at     REAL NOT NULL,
        taken_by         TEXT NOT NULL DEFAULT '',
        answer           BLOB
    )
    """,
    # Issue 18, the cluster's change feed and shared console sessions. Every change another
    # relay must learn of (a node enrolled, revoked, re-keyed, re-tagged, re-described; a
    # stream held, released or its status changed) stamps the row with the next number of
    # one counter, by trigger, so no writer can forget to; heartbeats and token refreshes do
    # not (they are the holder's own business). A relay reads only rows stamped after the
    # last number it saw. Console sessions and one-time login links live here too: the
    # SHA-256 of the secret as key, the operator token sealed under a key only the secret
    # gives (the cookie or link holder), never the secret itself.
    8: """
    CREATE TABLE change_feed (seq INTEGER NOT NULL);
    INSERT INTO change_feed (seq) VALUES (0);
    ALTER TABLE nodes ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE stream_holders ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX nodes_change_seq ON nodes (change_seq);
    CREATE INDEX stream_holders_change_seq ON stream_holders (change_seq);
    CREATE TRIGGER nodes_enrolled AFTER INSERT ON nodes BEGIN
        UPDATE change_feed SET seq = seq + 1;
        UPDATE nodes SET change_seq = (SELECT seq FROM change_feed) WHERE node_id = NEW.node_id;
    END;
    CREATE TRIGGER nodes_changed
    AFTER UPDATE OF status, public_key, key_thumbprint, capabilities, tags ON nodes BEGIN
        UPDATE change_feed SET seq = seq + 1;
        UPDATE nodes SET change_seq = (SELECT seq FROM change_feed) WHERE node_id = NEW.node_id;
    END;
    CREATE TRIGGER holders_held AFTER INSERT ON stream_holders BEGIN
        UPDATE change_feed SET seq = seq + 1;
        UPDATE stream_holders SET change_seq = (SELECT seq FROM change_feed)
        WHERE node_id = NEW.node_id;
    END;
    CREATE TRIGGER holders_changed
    AFTER UPDATE OF relay_id, generation, status, since ON stream_holders BEGIN
        UPDATE change_feed SET seq = seq + 1;
        UPDATE stream_holders SET change_seq = (SELECT seq FROM change_feed)
        WHERE node_id = NEW.node_id;
    END;
    CREATE TABLE console_sessions (
        secret_hash TEXT PRIMARY KEY,
        kind        TEXT NOT NULL CHECK (kind IN ('session', 'link')),
        sealed      BLOB NOT NULL,
        expires_at  REAL NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE INDEX console_sessions_expiry ON console_sessions (expires_at)
    """,
}
