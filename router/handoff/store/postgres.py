"""The outbox in PostgreSQL (`postgresql://user@host/db`), through an asyncpg pool: for a
router pair sharing one outbox."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from router.handoff.store.base import (
    COLUMNS,
    FINAL_SQL,
    MAX_BATCH,
    HandoffStore,
    Need,
    StatusChange,
    StoredHandoff,
    StoreError,
    by_urgency,
    entry_of,
    filters,
    history_json,
    need_sql,
    new_rows,
    row_to_handoff,
)

CONNECT_TIMEOUT_S = 10.0

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS handoffs (
    id TEXT PRIMARY KEY,
    from_force TEXT NOT NULL,
    incident_id TEXT NOT NULL,
    to_force TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    incident JSONB NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    escalated_at DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION,
    history JSONB NOT NULL,
    UNIQUE (from_force, incident_id)
);
CREATE INDEX IF NOT EXISTS handoffs_by_status ON handoffs (status, to_force, accepted_at);
ALTER TABLE handoffs ADD COLUMN IF NOT EXISTS claimed_by TEXT;
ALTER TABLE handoffs ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS handoffs_open ON handoffs (priority, accepted_at)
    WHERE status NOT IN (""" + FINAL_SQL + """);
"""
_PG_SCHEMA_READY = (
    "SELECT to_regclass('handoffs_open') IS NOT NULL AND EXISTS (SELECT 1 FROM "
    "information_schema.columns WHERE table_schema = current_schema() AND table_name = "
    "'handoffs' AND column_name = 'lease_until')"
)
NOW = "extract(epoch FROM clock_timestamp())::float8"  # leases run on the database's clock

# the whole batch in one statement (one round trip); RETURNING names only the rows inserted.
# JSON travels as text (a history is itself a list, which an array parameter would unpack).
_PG_INSERT = (
    f"INSERT INTO handoffs ({COLUMNS}, claimed_by, lease_until) SELECT c1, c2, c3, c4, c5, c6, "
    f"c7::jsonb, c8, c9, c10, c11, c12, c13, c14::jsonb, $15::text, {NOW} + $16 "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::text[], $6::text[], $7::text[], $8::float8[], $9::float8[], $10::int[], $11::text[], "
    "$12::float8[], $13::float8[], $14::text[]) "
    "AS t(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
_PG_CHANGE = (
    "UPDATE handoffs SET status = $1, updated_at = $2, attempts = GREATEST(attempts, $3), "
    "reason = COALESCE($4, reason), escalated_at = COALESCE(escalated_at, $5), "
    "to_force = COALESCE($9::text, to_force), "
    # sent on to another partner by this router: it delivers it afresh
    "claimed_by = CASE WHEN $9::text IS NOT NULL THEN $10 ELSE claimed_by END, "
    f"lease_until = CASE WHEN $9::text IS NOT NULL THEN {NOW} + $11 ELSE lease_until END, "
    "delivered_at = CASE WHEN $9::text IS NOT NULL THEN NULL "
    "ELSE COALESCE(delivered_at, $6) END, history = history || $7::jsonb "
    "WHERE id = $8 AND status NOT IN (" + FINAL_SQL + ")"
)
_PG_NEED = need_sql("$3", "(SELECT unnest($4::text[]))")
# SKIP LOCKED: routers claiming at once each get other rows, none waits on another
_PG_CLAIM = (
    f"UPDATE handoffs SET claimed_by = $1, lease_until = {NOW} + $2 WHERE id IN ("
    f"SELECT id FROM handoffs WHERE {_PG_NEED} AND (claimed_by IS NULL OR lease_until < {NOW} "
    "OR ($5 AND claimed_by = $1)) ORDER BY priority, accepted_at LIMIT $6 "
    f"FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
)
# rows locked in id order, as the group commit changes them (`_flush`): two statements taking
# the same rows in one order cannot deadlock
_PG_RENEW = (
    f"UPDATE handoffs SET lease_until = {NOW} + $2 WHERE id IN (SELECT id FROM handoffs "
    f"WHERE claimed_by = $1 AND id = ANY($5::text[]) AND {_PG_NEED} ORDER BY id FOR UPDATE) "
    "RETURNING id"
)


async def _pg_init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


class PostgresStore(HandoffStore):
    """PostgreSQL through an asyncpg pool, for a router pair sharing one outbox."""

    def __init__(self, dsn: str, pool_size: int = 4, max_batch: int = MAX_BATCH):
        super().__init__(max_batch)
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def _open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_size, init=_pg_init,
                timeout=CONNECT_TIMEOUT_S, command_timeout=CONNECT_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot open PostgreSQL store: {exc}") from exc
        # the advisory lock serialises schema creation between routers starting together
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7242001)")
            # only when something is missing: ALTER TABLE locks the table against the routers
            # already running, even when it has nothing to add
            if not await conn.fetchval(_PG_SCHEMA_READY):
                await conn.execute(_PG_SCHEMA)

    def row_fault(self, exc: Exception) -> bool:
        # class 22 (data exception: NUL in text or jsonb, bad encoding) and 23 (a constraint)
        return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
                          ) or super().row_fault(exc)

    async def _close(self) -> None:
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_S)
            self._pool = None

    async def _flush(self, inserts: Sequence[StoredHandoff],
                     changes: Sequence[StatusChange]) -> tuple[set[str], set[str]]:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            created: set[str] = set()
            if inserts:
                rows = new_rows(inserts, set())  # ON CONFLICT cannot take one id twice
                columns = list(zip(*[
                    (h.id, h.from_force, h.incident_id, h.to_force, h.priority, h.status,
                     json.dumps(h.incident), h.accepted_at, h.updated_at, h.attempts, h.reason,
                     h.escalated_at, h.delivered_at, history_json(h.history))
                    for h in rows], strict=True))
                created = {r["id"] for r in await conn.fetch(
                    _PG_INSERT, *map(list, columns), self.owner, self.lease_s)}
            changed: set[str] = set()
            if changes:
                changed = {r["id"] for r in await conn.fetch(
                    "SELECT id FROM handoffs WHERE id = ANY($1::text[])",
                    list({c.id for c in changes}))}
                # in id order (a stable sort: one handoff's changes keep theirs), as claims are
                # renewed, so that neither can deadlock the other
                await conn.executemany(_PG_CHANGE, [
                    (c.status, c.at, c.attempts, c.reason, c.escalated_at, c.delivered_at,
                     [entry_of(c).as_json()], c.id, c.to_force, self.owner, self.lease_s)
                    for c in sorted(changes, key=lambda c: c.id)])
        return created, changed

    async def _select(self, where: str, params: Sequence[Any], tail: str = "") -> list[
            StoredHandoff]:
        assert self._pool is not None
        rows = await self._pool.fetch(f"SELECT {COLUMNS} FROM handoffs {where} {tail}", *params)
        return [row_to_handoff(tuple(r)) for r in rows]

    async def get(self, handoff_id: str) -> StoredHandoff | None:
        rows = await self._select("WHERE id = $1", (handoff_id,))
        return rows[0] if rows else None

    async def query(self, *, status: str | None = None, to: str | None = None,
                    limit: int = 100) -> list[StoredHandoff]:
        where, params = filters(status, to, "$1", "$2")
        return await self._select(where, [*params, limit],
                                  f"ORDER BY accepted_at LIMIT ${len(params) + 1}")

    async def claim(self, need: Need, *, limit: int, mine: bool = False) -> list[StoredHandoff]:
        assert self._pool is not None
        rows = await self._pool.fetch(_PG_CLAIM, self.owner, self.lease_s, need.awaiting_since,
                                      list(need.awaited), mine, limit)
        return by_urgency([row_to_handoff(tuple(r)) for r in rows])

    async def renew(self, ids: Sequence[str], need: Need) -> set[str]:
        assert self._pool is not None
        if not ids:
            return set()
        rows = await self._pool.fetch(_PG_RENEW, self.owner, self.lease_s, need.awaiting_since,
                                      list(need.awaited), list(ids))
        return {r["id"] for r in rows}

    async def release(self) -> None:
        assert self._pool is not None
        await self._pool.execute("UPDATE handoffs SET claimed_by = NULL, lease_until = NULL "
                                 "WHERE claimed_by = $1", self.owner)
