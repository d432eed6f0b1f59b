"""The PostgreSQL schema as numbered migrations, version for version the same tables and
meaning as ``sqlite_schema`` (BYTEA for BLOB, DOUBLE PRECISION for REAL). ``PostgresStore``
applies the missing ones at start under an advisory lock, each in one transaction with its
``schema_version`` row. A migration, once released, is never edited: a change is a new
number, here and in ``sqlite_schema`` alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["FEED_LOCK", "MIGRATION_LOCK"]

MIGRATION_LOCK: Final = 0x6165676973_0016
"""The ``pg_advisory_lock`` key held while migrating: two relays starting together on one
database take turns, and the second finds nothing left to do."""

FEED_LOCK: Final = 0x6567_6973_6665_6518
"""The ``pg_advisory_xact_lock`` key migration 8's trigger takes before numbering a change
(spelled out in its SQL; a test holds them equal)."""

_MIGRATIONS: Final[Mapping[int, str]] = {
    1: """
    CREATE TABLE nodes (
        node_id           TEXT PRIMARY KEY,
        tenant_id         TEXT NOT NULL,
        public_key        BYTEA NOT NULL,
        key_thumbprint    TEXT NOT NULL,
        status            TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        revoked_reason    TEXT NOT NULL DEFAULT '',
        revoked_at        DOUBLE PRECISION,
        enrolled_at       DOUBLE PRECISION NOT NULL,
        last_heartbeat_at DOUBLE PRECISION,
        capabilities      TEXT NOT NULL DEFAULT '{}',
        tags              TEXT NOT NULL DEFAULT '[]',
        token_jti         TEXT NOT NULL DEFAULT '',
        token_expires_at  DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX nodes_tenant ON nodes (tenant_id);
    CREATE TABLE enrollment_tokens (
        jti         TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        redeemed_at DOUBLE PRECISION NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE revocations (
        kind        TEXT NOT NULL CHECK (kind IN ('token', 'key')),
        id          TEXT NOT NULL,
        prune_after DOUBLE PRECISION,
        revoked_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE deleted_tenants (
        tenant_id  TEXT PRIMARY KEY,
        deleted_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE commands (
        command_id       TEXT PRIMARY KEY,
        node_id          TEXT NOT NULL,
        tenant_id        TEXT NOT NULL,
        fleet_command_id TEXT NOT NULL DEFAULT '',
        tool             TEXT NOT NULL,
        dispatched_at    DOUBLE PRECISION NOT NULL,
        finished_at      DOUBLE PRECISION,
        outcome          TEXT NOT NULL DEFAULT '',
        exit_code        INTEGER,
        error            TEXT NOT NULL DEFAULT '',
        stdout_tail      BYTEA NOT NULL DEFAULT '',
        stderr_tail      BYTEA NOT NULL DEFAULT ''
    );
    CREATE INDEX commands_node ON commands (node_id, dispatched_at DESC);
    CREATE TABLE fleet_runs (
        fleet_command_id TEXT PRIMARY KEY,
        tenant_id        TEXT NOT NULL DEFAULT '',
        scope            TEXT,
        spec             TEXT NOT NULL,
        outcome          TEXT NOT NULL,
        created_at       DOUBLE PRECISION NOT NULL,
        finished_at      DOUBLE PRECISION,
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
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant_id, name)
    );
    """,
    3: """
    ALTER TABLE fleet_runs ADD COLUMN args_json TEXT;
    ALTER TABLE fleet_runs ADD COLUMN secret_keys TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE fleet_runs ADD COLUMN rerun_of TEXT NOT NULL DEFAULT ''
    """,
    4: """
    ALTER TABLE commands ADD COLUMN result_json TEXT NOT NULL DEFAULT ''
    """,  # Issue 18, cluster identity: each relay's published token-signing key (by kid), the
    # cluster (its CA certificate, never the CA key) and each relay's advertised endpoint.
    5: """
    CREATE TABLE relay_keys (
        kid        TEXT PRIMARY KEY,
        public_key BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE clusters (
        name       TEXT PRIMARY KEY,
        ca_cert    TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE relay_endpoints (
        relay_id   TEXT PRIMARY KEY,
        cluster    TEXT NOT NULL,
        endpoint   TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    6: """
    CREATE TABLE relay_leases (
        relay_id   TEXT PRIMARY KEY,
        endpoint   TEXT NOT NULL DEFAULT '',
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE stream_holders (
        node_id    TEXT PRIMARY KEY,
        relay_id   TEXT NOT NULL DEFAULT '',
        generation BIGINT NOT NULL,
        status     TEXT NOT NULL,
        since      DOUBLE PRECISION NOT NULL
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
        deadline         DOUBLE PRECISION NOT NULL DEFAULT 0,
        timeout_secs     DOUBLE PRECISION NOT NULL DEFAULT 0,
        state            TEXT NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'sent', 'done', 'collected')),
        cancel           TEXT NOT NULL DEFAULT '',
        cancel_sent      INTEGER NOT NULL DEFAULT 0,
        created_at       DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX routed_commands_holder ON routed_commands (holder, state);
    CREATE INDEX routed_commands_coordinator ON routed_commands (coordinator, state);
    CREATE TABLE run_leases (
        fleet_command_id TEXT PRIMARY KEY,
        coordinator      TEXT NOT NULL,
        expires_at       DOUBLE PRECISION NOT NULL
    );
    """,
    # Issue 18, routing gaps: live output of routed commands waiting for their coordinator
    # (capped per command), and cancels of fleet runs asked for through a
    # relay that does not coordinate them (``taken_by``: the coordinator that acted on it;
    # ``answer``: the run as it saw it then, a serialized FleetRun).
    7: """
    CREATE TABLE routed_output (
        command_id     TEXT NOT NULL,
        seq            BIGINT NOT NULL,
        stdout         BYTEA NOT NULL,
        stderr         BYTEA NOT NULL,
        dropped_before BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (command_id, seq)
    );
    CREATE TABLE run_cancels (
        fleet_command_id TEXT PRIMARY KEY,
        reason           TEXT NOT NULL,
        requested_at     DOUBLE PRECISION NOT NULL,
        taken_by         TEXT NOT NULL DEFAULT '',
        answer           BYTEA
    );
    """,
    # Issue 18: the change feed and console sessions (see sqlite_schema's 8). One sequence
    # numbers every feed change; the trigger takes FEED_LOCK before drawing a number, so
    # feed writers commit in the order of their numbers and a reader that saw number n has
    # seen every change numbered below it (no change commits late under a smaller number).
    # It also signals NODES_CHANGED ('changed', once per transaction however many rows):
    # reading the feed is cheap, so the other relays read it at once, not at their next sync.
    8: """
    CREATE SEQUENCE change_feed;
    ALTER TABLE nodes ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE stream_holders ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX nodes_change_seq ON nodes (change_seq);
    CREATE INDEX stream_holders_change_seq ON stream_holders (change_seq);
    CREATE FUNCTION aegis_feed_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(7306924864791995672);
        NEW.change_seq := nextval('change_feed');
        PERFORM pg_notify('aegis_nodes', 'changed');
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER nodes_enrolled BEFORE INSERT ON nodes
        FOR EACH ROW EXECUTE FUNCTION aegis_feed_stamp();
    CREATE TRIGGER nodes_changed
        BEFORE UPDATE OF status, public_key, key_thumbprint, capabilities, tags ON nodes
        FOR EACH ROW EXECUTE FUNCTION aegis_feed_stamp();
    CREATE TRIGGER holders_changed BEFORE INSERT OR UPDATE ON stream_holders
        FOR EACH ROW EXECUTE FUNCTION aegis_feed_stamp();
    CREATE TABLE console_sessions (
        secret_hash TEXT PRIMARY KEY,
        kind        TEXT NOT NULL CHECK (kind IN ('session', 'link')),
        sealed      BYTEA NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
    """,
}
