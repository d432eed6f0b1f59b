"""The one place a store is built from its URL (``--store`` / ``AEGIS_STORE_URL``)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Final

from aegis_edge_relay import jsonlog
from aegis_edge_relay.store.base import Store, StoreError
from aegis_edge_relay.store.postgres import PostgresStore, redact_url
from aegis_edge_relay.store.sqlite import SQLiteStore

__all__ = ["STORE_FILE", "open_store"]

STORE_FILE: Final = "relay.db"
"""The SQLite store's file in the data dir (the default store)."""

POSTGRES_SCHEMES: Final = ("postgresql", "postgres")


def open_store(url: str | None, data_dir: Path) -> Store:
    """The store ``url`` names, migrated to this version's schema: none (or empty) is
    SQLite in ``data_dir``; ``postgresql://`` (or ``postgres://``) a PostgreSQL database.

    Raises :class:`StoreUnavailable` when the server cannot be reached and
    :class:`StoreError` for a URL of another kind; neither message shows a password."""
    if not url:
        store = SQLiteStore(data_dir / STORE_FILE)
        for path, old in store.tightened:
            jsonlog.log("warning", "file.mode_tightened", path=path, old_mode=f"{old:04o}")
        return store
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        return PostgresStore(url)
    raise StoreError(
        f"store URL {redact_url(url)!r}: unknown kind of store {scheme or '(no scheme)'!r}",
        hint="use postgresql://USER@HOST[:PORT]/DATABASE (or postgres://), "
        "or leave --store out for SQLite in the data dir",
    )
