"""The PostgreSQL store's queries about daemons and keys: nodes and enrollment,
revocations, the cluster's identity (relay keys, the CA, endpoints) and console sessions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import DictRow

from aegis_edge_relay.store.base import (
    NODES_CHANGED,
    ConsoleSecret,
    NodeRecord,
    StoreError,
    TokenAlreadyRedeemed,
)
from aegis_edge_relay.store.postgres_base import Cursor, PostgresBase
from aegis_edge_relay.store.rows import (
    capabilities_json,
    console_secret_from,
    node_from,
    node_values,
    tags_json,
)


class PostgresNodes(PostgresBase):
    """Nodes, revocations, cluster identity and console sessions."""

    # -- nodes

    def load_nodes(self) -> list[NodeRecord]:
        rows = self._read(lambda cur: cur.execute("SELECT * FROM nodes ORDER BY node_id"))
        return [node_from(r) for r in rows]

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._one("SELECT * FROM nodes WHERE node_id = %s", (node_id,))
        return node_from(row) if row is not None else None

    def is_tenant_deleted(self, tenant_id: str) -> bool:
        return (
            self._one("SELECT 1 FROM deleted_tenants WHERE tenant_id = %s", (tenant_id,))
            is not None
        )

    def enroll(self, *, jti: str, token_expires_at: float, node: NodeRecord) -> None:
        """Redeem ``jti`` and insert ``node`` in one transaction; a second redemption of
        the same ``jti`` raises :class:`TokenAlreadyRedeemed` and inserts nothing."""

        def tx(cur: Cursor) -> None:
            if cur.execute("SELECT 1 FROM enrollment_tokens WHERE jti = %s", (jti,)).fetchone():
                raise TokenAlreadyRedeemed(
                    "this enrollment token was already redeemed",
                    hint="enrollment tokens are single use; issue a fresh one",
                )
            if cur.execute(
                "SELECT 1 FROM deleted_tenants WHERE tenant_id = %s", (node.tenant_id,)
            ).fetchone():
                raise StoreError(
                    f"tenant {node.tenant_id!r} was deleted",
                    hint="a deleted tenant takes no new daemons",
                )
            cur.execute(
                "INSERT INTO enrollment_tokens (jti, tenant_id, node_id, redeemed_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (jti, node.tenant_id, node.node_id, node.enrolled_at, token_expires_at),
            )
            cur.execute(
                "INSERT INTO nodes (node_id, tenant_id, public_key, key_thumbprint, enrolled_at,"
                " capabilities, tags, token_jti, token_expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                node_values(node),
            )

        try:
            self._write(tx)
        except psycopg.errors.UniqueViolation as err:
            if err.diag.constraint_name != "enrollment_tokens_pkey":
                raise
            # Another relay redeemed it between our check and our insert.
            raise TokenAlreadyRedeemed(
                "this enrollment token was already redeemed",
                hint="enrollment tokens are single use; issue a fresh one",
            ) from None

    def set_capabilities(self, node_id: str, capabilities: Mapping[str, Any]) -> None:
        self._update(
            "UPDATE nodes SET capabilities = %s WHERE node_id = %s",
            (capabilities_json(capabilities), node_id),
        )

    def set_tags(self, node_id: str, tags: Sequence[str]) -> None:
        self._update("UPDATE nodes SET tags = %s WHERE node_id = %s", (tags_json(tags), node_id))

    def set_token(self, node_id: str, jti: str, expires_at: float) -> None:
        self._update(
            "UPDATE nodes SET token_jti = %s, token_expires_at = %s WHERE node_id = %s",
            (jti, expires_at, node_id),
        )

    def flush_heartbeats(self, beats: Mapping[str, float]) -> None:
        """Write many ``last_heartbeat_at`` values in one statement (``UNNEST`` of two
        arrays), one transaction."""
        if not beats:
            return
        ids = list(beats)
        stamps = [beats[n] for n in ids]
        self._update(
            "UPDATE nodes AS n SET last_heartbeat_at ="
            " GREATEST(COALESCE(n.last_heartbeat_at, 0), b.ts)"
            " FROM UNNEST(%s::text[], %s::float8[]) AS b(node_id, ts)"
            " WHERE n.node_id = b.node_id",
            (ids, stamps),
        )

    @staticmethod
    def _revoke_in(cur: Cursor, row: DictRow, reason: str, now: float, prune: float) -> None:
        cur.execute(
            "UPDATE nodes SET status = 'revoked', revoked_reason = %s, revoked_at = %s"
            " WHERE node_id = %s",
            (reason, now, row["node_id"]),
        )
        _revoke_id(cur, "key", row["key_thumbprint"], None, now)
        # Delivered at commit, once per transaction however many nodes it revoked.
        cur.execute("SELECT pg_notify(%s, 'revoked')", (NODES_CHANGED,))
        if row["token_jti"]:
            _revoke_id(
                cur, "token", row["token_jti"], max(prune, row["token_expires_at"] + 3600.0), now
            )

    def revoke_node(
        self, node_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> NodeRecord:
        """Mark the node Revoked and put its key and current token on the revocation list,
        in one transaction. Revoking twice keeps the first reason."""

        def tx(cur: Cursor) -> DictRow:
            row = _node_row(cur, node_id)
            if row["status"] != "revoked":
                self._revoke_in(cur, row, reason, now, token_prune_after)
            return _node_row(cur, node_id)

        return node_from(self._write(tx))

    def delete_tenant(
        self, tenant_id: str, *, reason: str, now: float, token_prune_after: float
    ) -> list[str]:
        """Record the tenant as deleted and revoke every daemon bound to it, in one
        transaction; returns the node ids that were revoked by this call."""

        def tx(cur: Cursor) -> list[str]:
            cur.execute(
                "INSERT INTO deleted_tenants (tenant_id, deleted_at) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (tenant_id, now),
            )
            rows = cur.execute(
                "SELECT * FROM nodes WHERE tenant_id = %s AND status != 'revoked' ORDER BY node_id",
                (tenant_id,),
            ).fetchall()
            for row in rows:
                self._revoke_in(cur, row, reason, now, token_prune_after)
            return [r["node_id"] for r in rows]

        return self._write(tx)

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
        the new token and revoke the old token and the old key, in one transaction. The
        rotated-out key goes on the key list for good (see ``SQLiteStore.rotate_key``)."""

        def tx(cur: Cursor) -> DictRow:
            row = _node_row(cur, node_id)
            if row["status"] == "revoked":
                raise StoreError(f"daemon {node_id} is revoked")
            if row["key_thumbprint"] != old_thumbprint:
                raise StoreError(
                    "the key changed while rotating", hint="another rotation won; reconnect"
                )
            if row["token_jti"]:
                _revoke_id(cur, "token", row["token_jti"], old_jti_prune_after, now)
            _revoke_id(cur, "key", old_thumbprint, None, now)
            cur.execute(
                "UPDATE nodes SET public_key = %s, key_thumbprint = %s, token_jti = %s,"
                " token_expires_at = %s WHERE node_id = %s",
                (new_public_key, new_thumbprint, new_jti, new_expires_at, node_id),
            )
            return _node_row(cur, node_id)

        return node_from(self._write(tx))

    # -- revocations

    def load_revocations(self) -> tuple[dict[str, float], set[str]]:
        tokens: dict[str, float] = {}
        keys: set[str] = set()
        rows = self._read(lambda cur: cur.execute("SELECT kind, id, prune_after FROM revocations"))
        for row in rows:
            if row["kind"] == "key":
                keys.add(row["id"])
            else:
                tokens[row["id"]] = row["prune_after"]
        return tokens, keys

    def revoke_token(self, jti: str, *, prune_after: float, now: float) -> None:
        self._write(lambda cur: _revoke_id(cur, "token", jti, prune_after, now))

    def prune_revocations(self, now: float) -> int:
        return self._update(
            "DELETE FROM revocations WHERE kind = 'token' AND prune_after < %s", (now,)
        )

    # -- cluster identity

    def publish_relay_key(self, kid: str, public_key: bytes, now: float) -> None:
        self._update(
            "INSERT INTO relay_keys (kid, public_key, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (kid) DO NOTHING",
            (kid, public_key, now),
        )

    def load_relay_keys(self) -> dict[str, bytes]:
        rows = self._read(lambda cur: cur.execute("SELECT kid, public_key FROM relay_keys"))
        return {row["kid"]: bytes(row["public_key"]) for row in rows}

    def join_cluster(self, name: str, ca_cert: str, now: float) -> str:
        def tx(cur: Cursor) -> str:
            cur.execute(
                "INSERT INTO clusters (name, ca_cert, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING",
                (name, ca_cert, now),
            )
            row = cur.execute("SELECT ca_cert FROM clusters WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return str(row["ca_cert"])

        return self._write(tx)

    def publish_endpoint(self, relay_id: str, cluster: str, endpoint: str, now: float) -> None:
        self._update(
            "INSERT INTO relay_endpoints (relay_id, cluster, endpoint, updated_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (relay_id) DO UPDATE SET"
            " cluster = EXCLUDED.cluster, endpoint = EXCLUDED.endpoint,"
            " updated_at = EXCLUDED.updated_at",
            (relay_id, cluster, endpoint, now),
        )

    def cluster_endpoints(self, cluster: str) -> list[str]:
        rows = self._read(
            lambda cur: cur.execute(
                "SELECT DISTINCT endpoint FROM relay_endpoints WHERE cluster = %s"
                " ORDER BY endpoint",
                (cluster,),
            )
        )
        return [row["endpoint"] for row in rows]

    def put_console_secret(self, secret_hash: str, secret: ConsoleSecret, now: float) -> None:
        def tx(cur: Cursor) -> None:
            cur.execute("DELETE FROM console_sessions WHERE expires_at <= %s", (now,))
            cur.execute(
                "INSERT INTO console_sessions (secret_hash, kind, sealed, expires_at, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (secret_hash, secret.kind, secret.sealed, secret.expires_at, now),
            )

        self._write(tx)

    def get_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._one(
            "SELECT * FROM console_sessions WHERE secret_hash = %s AND kind = %s"
            " AND expires_at > %s",
            (secret_hash, kind, now),
        )
        return console_secret_from(row) if row is not None else None

    def take_console_secret(self, secret_hash: str, kind: str, now: float) -> ConsoleSecret | None:
        row = self._write(
            lambda cur: cur.execute(
                "DELETE FROM console_sessions WHERE secret_hash = %s AND kind = %s RETURNING *",
                (secret_hash, kind),
            ).fetchone()
        )
        if row is None or row["expires_at"] <= now:
            return None
        return console_secret_from(row)


def _node_row(cur: Cursor, node_id: str) -> DictRow:
    row = cur.execute("SELECT * FROM nodes WHERE node_id = %s", (node_id,)).fetchone()
    if row is None:
        raise StoreError(f"daemon {node_id} not found")
    return row


def _revoke_id(cur: Cursor, kind: str, ident: str, prune_after: float | None, now: float) -> None:
    cur.execute(
        "INSERT INTO revocations (kind, id, prune_after, revoked_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (kind, id) DO UPDATE SET prune_after = EXCLUDED.prune_after,"
        " revoked_at = EXCLUDED.revoked_at",
        (kind, ident, prune_after, now),
    )
