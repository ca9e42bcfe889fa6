"""The outbox in SQLite (`sqlite:///path/to.db`): WAL, synchronous=FULL, for a single router.

Claims work as on PostgreSQL (one router, on one host, so its clock times the leases), but a
router starting takes every claim (`claim(mine=True)`): one router to a file."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from router.handoff.store.base import (
    COLUMNS,
    FINAL_SQL,
    MAX_BATCH,
    HandoffStore,
    Need,
    StatusChange,
    StoredHandoff,
    by_urgency,
    entry_of,
    filters,
    history_json,
    need_sql,
    new_rows,
    row_to_handoff,
)

log = logging.getLogger(__name__)

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS handoffs (
    id TEXT PRIMARY KEY,
    from_force TEXT NOT NULL,
    incident_id TEXT NOT NULL,
    to_force TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    incident TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    escalated_at REAL,
    delivered_at REAL,
    history TEXT NOT NULL,
    UNIQUE (from_force, incident_id)
);
CREATE INDEX IF NOT EXISTS handoffs_by_status ON handoffs (status, to_force, accepted_at);
"""
_SQLITE_CLAIMS = (  # added to a table made before claims existed
    ("claimed_by", "ALTER TABLE handoffs ADD COLUMN claimed_by TEXT"),
    ("lease_until", "ALTER TABLE handoffs ADD COLUMN lease_until REAL"),
)
_SQLITE_OPEN_INDEX = ("CREATE INDEX IF NOT EXISTS handoffs_open ON handoffs (priority, "
                      f"accepted_at) WHERE status NOT IN ({FINAL_SQL})")

_SQLITE_INSERT = (
    "INSERT OR IGNORE INTO handoffs (id, from_force, incident_id, to_force, priority, status, "
    "incident, accepted_at, updated_at, attempts, reason, escalated_at, delivered_at, history, "
    "claimed_by, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_CHANGE = (
    "UPDATE handoffs SET status = :status, updated_at = :at, "
    "attempts = MAX(attempts, :attempts), reason = COALESCE(:reason, reason), "
    "escalated_at = COALESCE(escalated_at, :escalated_at), "
    "to_force = COALESCE(:to_force, to_force), "
    "claimed_by = CASE WHEN :to_force IS NOT NULL THEN :owner ELSE claimed_by END, "
    "lease_until = CASE WHEN :to_force IS NOT NULL THEN :lease_until ELSE lease_until END, "
    "delivered_at = CASE WHEN :to_force IS NOT NULL THEN NULL "
    "ELSE COALESCE(delivered_at, :delivered_at) END, "
    "history = json_insert(history, '$[#]', json(:entry)) "
    "WHERE id = :id AND status NOT IN (" + FINAL_SQL + ")"
)
_SQLITE_NEED = need_sql(":since", "(SELECT value FROM json_each(:awaited))")
_SQLITE_CLAIM = (
    "UPDATE handoffs SET claimed_by = :owner, lease_until = :until WHERE id IN ("
    f"SELECT id FROM handoffs WHERE {_SQLITE_NEED} AND (claimed_by IS NULL OR "
    "lease_until < :now OR :mine) ORDER BY priority, accepted_at LIMIT :limit) "
    f"RETURNING {COLUMNS}"
)
_SQLITE_RENEW = (
    "UPDATE handoffs SET lease_until = :until WHERE claimed_by = :owner AND id IN "
    f"(SELECT value FROM json_each(:ids)) AND {_SQLITE_NEED} RETURNING id"
)


class SqliteStore(HandoffStore):
    """SQLite in WAL mode: one connection writes (the group-commit writer), one reads, so
    status queries never wait behind a commit, and one claims (its transactions must not
    interleave with the writer's)."""

    def __init__(self, path: Path, max_batch: int = MAX_BATCH):
        super().__init__(max_batch)
        self.path = path
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        self._claims: aiosqlite.Connection | None = None

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write = await aiosqlite.connect(self.path, isolation_level=None)
        # FULL: the WAL is fsynced at every commit, so a 202 survives a power cut, not just a
        # crash of this process; group commit is what keeps that affordable.
        await self._write.execute("PRAGMA journal_mode=WAL")
        await self._write.execute("PRAGMA synchronous=FULL")
        await self._write.execute("PRAGMA busy_timeout=5000")
        await self._write.executescript(_SQLITE_SCHEMA)
        async with self._write.execute("PRAGMA table_info(handoffs)") as cur:
            columns = {r[1] for r in await cur.fetchall()}
        for column, add in _SQLITE_CLAIMS:
            if column not in columns:
                await self._write.execute(add)
        await self._write.execute(_SQLITE_OPEN_INDEX)
        self._read = await aiosqlite.connect(self.path, isolation_level=None)
        await self._read.execute("PRAGMA busy_timeout=5000")
        self._claims = await aiosqlite.connect(self.path, isolation_level=None)
        await self._claims.execute("PRAGMA busy_timeout=5000")

    def row_fault(self, exc: Exception) -> bool:
        return isinstance(exc, (sqlite3.DataError, sqlite3.IntegrityError,
                                sqlite3.InterfaceError)) or super().row_fault(exc)

    async def _close(self) -> None:
        conns = (self._claims, self._read, self._write)
        self._claims = self._read = self._write = None
        for conn in conns:  # each, whatever the others do: an open one keeps its thread alive
            if conn is not None:
                try:
                    await conn.close()
                except Exception as exc:
                    log.error("closing the handoff store: %s", exc)

    async def _flush(self, inserts: Sequence[StoredHandoff],
                     changes: Sequence[StatusChange]) -> tuple[set[str], set[str]]:
        assert self._write is not None
        db = self._write
        await db.execute("BEGIN IMMEDIATE")
        try:
            created: set[str] = set()
            if inserts:
                ids = [h.id for h in inserts]
                marks = ",".join("?" * len(ids))
                async with db.execute(f"SELECT id FROM handoffs WHERE id IN ({marks})",
                                      ids) as cur:
                    existing = {r[0] for r in await cur.fetchall()}
                rows = new_rows(inserts, existing)
                cur = await db.executemany(_SQLITE_INSERT, [
                    (h.id, h.from_force, h.incident_id, h.to_force, h.priority, h.status,
                     json.dumps(h.incident), h.accepted_at, h.updated_at, h.attempts, h.reason,
                     h.escalated_at, h.delivered_at, history_json(h.history), self.owner,
                     time.time() + self.lease_s) for h in rows])
                created = {h.id for h in rows}
                if cur.rowcount != len(rows):
                    # the (from, incident_id) constraint ignored some: those are absent
                    async with db.execute(f"SELECT id FROM handoffs WHERE id IN ({marks})",
                                          ids) as cur:
                        created = {r[0] for r in await cur.fetchall()} - existing
            changed: set[str] = set()
            if changes:
                cur = await db.executemany(_SQLITE_CHANGE, [
                    {"status": c.status, "at": c.at, "attempts": c.attempts,
                     "reason": c.reason, "escalated_at": c.escalated_at,
                     "to_force": c.to_force, "delivered_at": c.delivered_at,
                     "entry": json.dumps(entry_of(c).as_json()), "id": c.id,
                     "owner": self.owner, "lease_until": time.time() + self.lease_s}
                    for c in changes])
                changed = {c.id for c in changes}
                if cur.rowcount != len(changes):  # some missing, or already final: which?
                    ids = list(changed)
                    marks = ",".join("?" * len(ids))
                    async with db.execute(f"SELECT id FROM handoffs WHERE id IN ({marks})",
                                          ids) as cur:
                        changed = {r[0] for r in await cur.fetchall()}
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        return created, changed

    async def _select(self, where: str, params: Sequence[Any], tail: str = "") -> list[
            StoredHandoff]:
        assert self._read is not None
        sql = f"SELECT {COLUMNS} FROM handoffs {where} {tail}"
        async with self._read.execute(sql, params) as cur:
            return [row_to_handoff(tuple(r)) for r in await cur.fetchall()]

    async def get(self, handoff_id: str) -> StoredHandoff | None:
        rows = await self._select("WHERE id = ?", (handoff_id,))
        return rows[0] if rows else None

    async def query(self, *, status: str | None = None, to: str | None = None,
                    limit: int = 100) -> list[StoredHandoff]:
        where, params = filters(status, to, "?", "?")
        return await self._select(where, [*params, limit], "ORDER BY accepted_at LIMIT ?")

    async def claim(self, need: Need, *, limit: int, mine: bool = False) -> list[StoredHandoff]:
        now = time.time()
        rows = await self._claiming(_SQLITE_CLAIM, {
            "owner": self.owner, "until": now + self.lease_s, "now": now, "mine": mine,
            "limit": limit, **_need(need)})
        return by_urgency([row_to_handoff(r) for r in rows])

    async def renew(self, ids: Sequence[str], need: Need) -> set[str]:
        if not ids:
            return set()
        rows = await self._claiming(_SQLITE_RENEW, {
            "owner": self.owner, "until": time.time() + self.lease_s, "ids": json.dumps(
                list(ids)), **_need(need)})
        return {r[0] for r in rows}

    async def release(self) -> None:
        await self._claiming("UPDATE handoffs SET claimed_by = NULL, lease_until = NULL "
                             "WHERE claimed_by = :owner", {"owner": self.owner})

    async def _claiming(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        assert self._claims is not None
        async with self._claims.execute(sql, params) as cur:
            return [tuple(r) for r in await cur.fetchall()]


def _need(need: Need) -> dict[str, Any]:
    return {"since": need.awaiting_since, "awaited": json.dumps(list(need.awaited))}
