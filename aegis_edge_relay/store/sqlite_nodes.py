"""The SQLite store's queries about daemons and keys: nodes and enrollment, revocations,
the cluster's identity (relay keys, the CA, endpoints) and console sessions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from aegis_edge_relay.store.base import ConsoleSecret, NodeRecord, StoreError, TokenAlreadyRedeemed
from aegis_edge_relay.store.rows import (
    capabilities_json,
    console_secret_from,
    node_from,
    node_values,
    tags_json,
)
from aegis_edge_relay.store.sqlite_base import SQLiteBase


class SQLiteNodes(SQLiteBase):
    """Nodes, revocations, cluster identity and console sessions."""

    # -- nodes

    def load_nodes(self) -> list[NodeRecord]:
        return [node_from(r) for r in self._db.execute("SELECT * FROM nodes ORDER BY node_id")]

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(row) if row is not None else None

    def is_tenant_deleted(self, tenant_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM deleted_tenants WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return row is not None

    def enroll(self, *, jti: str, token_expires_at: float, node: NodeRecord) -> None:
        """Redeem ``jti`` and insert ``node`` in one transaction; a second redemption of
        the same ``jti`` raises :class:`TokenAlreadyRedeemed` and inserts nothing."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM enrollment_tokens WHERE jti = ?", (jti,)).fetchone():
                raise TokenAlreadyRedeemed(
                    "this enrollment token was already redeemed",
                    hint="enrollment tokens are single use; issue a fresh one",
                )
            if db.execute(
                "SELECT 1 FROM deleted_tenants WHERE tenant_id = ?", (node.tenant_id,)
            ).fetchone():
                raise StoreError(
                    f"tenant {node.tenant_id!r} was deleted",
                    hint="a deleted tenant takes no new daemons",
                )
            db.execute(
                "INSERT INTO enrollment_tokens (jti, tenant_id, node_id, redeemed_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (jti, node.tenant_id, node.node_id, node.enrolled_at, token_expires_at),
            )
            db.execute(
                "INSERT INTO nodes (node_id, tenant_id, public_key, key_thumbprint, enrolled_at,"
                " capabilities, tags, token_jti, token_expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                node_values(node),
            )

    def set_capabilities(self, node_id: str, capabilities: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET capabilities = ? WHERE node_id = ?",
                (capabilities_json(capabilities), node_id),
            )

    def set_tags(self, node_id: str, tags: Sequence[str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET tags = ? WHERE node_id = ?",
                (tags_json(tags), node_id),
            )

    def set_token(self, node_id: str, jti: str, expires_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET token_jti = ?, token_expires_at = ? WHERE node_id = ?",
                (jti, expires_at, node_id),
            )

    def flush_heartbeats(self, beats: Mapping[str, float]) -> None:
        """Write many ``last_heartbeat_at`` values in one transaction."""
        if not beats:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE nodes SET last_heartbeat_at = MAX(COALESCE(last_heartbeat_at, 0), ?)"
                " WHERE node_id = ?",
                [(ts, node_id) for node_id, ts in beats.items()],
            )

    def _revoke_in(
        self, db: sqlite3.Connection, row: sqlite3.Row, reason: str, now: float, prune: float
    ) -> None:
        db.execute(
            "UPDATE nodes SET status = 'revoked', revoked_reason = ?, revoked_at = ?"
            " WHERE node_id = ?",
            (reason, now, row["node_id"]),
        )
        db.execute(
            "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
            " VALUES ('key', ?, NULL, ?)",
            (row["key_thumbprint"], now),
        )
        if row["token_jti"]:
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('token', ?, ?, ?)",
                (row["token_jti"], max(prune, row["token_expires_at"] + 3600.0), now),
            )

    def revoke_node(
        self, node_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> NodeRecord:
        """Mark the node Revoked and put its key and current token on the revocation list,
        in one transaction. Revoking twice keeps the first reason."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise StoreError(f"daemon {node_id} not found")
            if row["status"] != "revoked":
                self._revoke_in(db, row, reason, now, token_prune_after)
            updated = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(updated)

    def delete_tenant(
        self, tenant_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> list[str]:
        """Record the tenant as deleted and revoke every daemon bound to it, in one
        transaction; returns the node ids that were revoked by this call."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO deleted_tenants (tenant_id, deleted_at) VALUES (?, ?)",
                (tenant_id, now),
            )
            rows = db.execute(
                "SELECT * FROM nodes WHERE tenant_id = ? AND status != 'revoked'", (tenant_id,)
            ).fetchall()
            for row in rows:
                self._revoke_in(db, row, reason, now, token_prune_after)
        return [r["node_id"] for r in rows]

    def rotate_key(
        self,
        node_id: str,
        *,
        old_thumbprint: str,
        new_public_key: bytes,
        new_thumbprint: str,
        new_jti: str,
        new_expires_at: float,
        old_jti_prune_after: float,
        now: float,
    ) -> NodeRecord:
        """Swap the node's key if it is still ``old_thumbprint`` (compare and swap), record
        the new token and revoke the old token and the old key, in one transaction.

        The rotated-out key goes on the key list for good: a key its owner stopped using
        may be lying in a backup, and must neither enroll as a new node nor attest."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise StoreError(f"daemon {node_id} not found")
            if row["status"] == "revoked":
                raise StoreError(f"daemon {node_id} is revoked")
            if row["key_thumbprint"] != old_thumbprint:
                raise StoreError(
                    "the key changed while rotating", hint="another rotation won; reconnect"
                )
            if row["token_jti"]:
                db.execute(
                    "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                    " VALUES ('token', ?, ?, ?)",
                    (row["token_jti"], old_jti_prune_after, now),
                )
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('key', ?, NULL, ?)",
                (old_thumbprint, now),
            )
            db.execute(
                "UPDATE nodes SET public_key = ?, key_thumbprint = ?, token_jti = ?,"
                " token_expires_at = ? WHERE node_id = ?",
                (new_public_key, new_thumbprint, new_jti, new_expires_at, node_id),
            )
            updated = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_from(updated)

    # -- revocations

    def load_revocations(self) -> tuple[dict[str, float], set[str]]:
        tokens: dict[str, float] = {}
        keys: set[str] = set()
        for row in self._db.execute("SELECT kind, id, prune_after FROM revocations"):
            if row["kind"] == "key":
                keys.add(row["id"])
            else:
                tokens[row["id"]] = row["prune_after"]
        return tokens, keys

    def revoke_token(self, jti: str, *, prune_after: float, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO revocations (kind, id, prune_after, revoked_at)"
                " VALUES ('token', ?, ?, ?)",
                (jti, prune_after, now),
            )

    def prune_revocations(self, now: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM revocations WHERE kind = 'token' AND prune_after < ?", (now,)
            )
            return cur.rowcount

    # -- cluster identity

    def publish_relay_key(self, kid: str, public_key: bytes, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO relay_keys (kid, public_key, created_at) VALUES (?, ?, ?)",
                (kid, public_key, now),
            )

    def load_relay_keys(self) -> dict[str, bytes]:
        rows = self._db.execute("SELECT kid, public_key FROM relay_keys")
        return {row["kid"]: bytes(row["public_key"]) for row in rows}

    def join_cluster(self, name: str, ca_cert: str, now: float) -> str:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO clusters (name, ca_cert, created_at) VALUES (?, ?, ?)",
                (name, ca_cert, now),
            )
            row = db.execute("SELECT ca_cert FROM clusters WHERE name = ?", (name,)).fetchone()
            return str(row["ca_cert"])

    def publish_endpoint(self, relay_id: str, cluster: str, endpoint: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO relay_endpoints (relay_id, cluster, endpoint, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (relay_id, cluster, endpoint, now),
            )

    def cluster_endpoints(self, cluster: str) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT endpoint FROM relay_endpoints WHERE cluster = ? ORDER BY endpoint",
            (cluster,),
        )
        return [row["endpoint"] for row in rows]

    def put_console_secret(self, secret_hash: str, secret: ConsoleSecret, now: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
            db.execute(
                "INSERT INTO console_sessions (secret_hash, kind, sealed, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (secret_hash, secret.kind, secret.sealed, secret.expires_at, now),
            )

    def get_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._db.execute(
            "SELECT * FROM console_sessions WHERE secret_hash = ? AND kind = ? AND expires_at > ?",
            (secret_hash, kind, now),
        ).fetchone()
        return console_secret_from(row) if row is not None else None

    def take_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM console_sessions WHERE secret_hash = ? AND kind = ? RETURNING *",
                (secret_hash, kind),
            ).fetchone()
        if row is None or row["expires_at"] <= now:
            return None
        return console_secret_from(row)
