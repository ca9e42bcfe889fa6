"""The durable outbox of incident handoffs: one interface (`base`), SQLite or PostgreSQL
behind it, the URL choosing: `sqlite:///path/to.db` or `postgresql://user@host/db`.

This package's names are re-exported here, so callers import from `router.handoff.store`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from router.handoff.store.base import (
    MAX_BATCH,
    HandoffStore,
    HistoryEntry,
    Need,
    StatusChange,
    StoredHandoff,
    StoreError,
    storable,
)
from router.handoff.store.postgres import PostgresStore
from router.handoff.store.sqlite import SqliteStore

__all__ = ["MAX_BATCH", "HandoffStore", "HistoryEntry", "Need", "PostgresStore", "SqliteStore",
           "StatusChange", "StoreError", "StoredHandoff", "open_store", "storable",
           "store_for"]


def store_for(url: str, max_batch: int = MAX_BATCH) -> HandoffStore:
    """`sqlite:///relative/or/absolute.db` or `postgresql://...` (also `postgres://`)."""
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")), max_batch=max_batch)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, max_batch=max_batch)
    raise StoreError(f"handoff.store: unsupported URL {url!r} "
                     "(use sqlite:///path or postgresql://...)")


@contextlib.asynccontextmanager
async def open_store(url: str, max_batch: int = MAX_BATCH) -> AsyncIterator[HandoffStore]:
    store = store_for(url, max_batch)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
