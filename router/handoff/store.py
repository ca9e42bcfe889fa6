"""The durable outbox of incident handoffs: one interface, SQLite or PostgreSQL behind it.

A handoff is acknowledged to the partner only after its row is committed, so every write goes
through a *group commit*: concurrent callers queue their rows, one writer task commits
everything queued in a single transaction (one fsync) and then wakes each caller. Under load
the batch grows by itself, so throughput rises with concurrency instead of collapsing into one
fsync per request; alone, a caller waits for just its own commit.

Each row carries its status history as a JSON array appended in the same statement as the
status change, so a status and its history can never disagree. The URL picks the backend:
`sqlite:///path/to.db` (WAL, synchronous=FULL) or `postgresql://user@host/db` (asyncpg pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # rows in one transaction; bounds a commit's latency under a flood
CONNECT_TIMEOUT_S = 10.0
TERMINAL = ("delivered", "failed")


class StoreError(Exception):
    """The store URL is unusable, or the database refused a commit."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float  # epoch seconds
    status: str
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "status": self.status, "detail": self.detail}


@dataclass(slots=True)
class StoredHandoff:
    """One row of the outbox, as the desk reads it back."""

    id: str
    from_force: str
    incident_id: str
    to_force: str
    priority: str
    status: str
    incident: dict[str, Any]  # the contract JSON, exactly as accepted
    accepted_at: float
    updated_at: float
    attempts: int = 0
    reason: str = ""
    escalated_at: float | None = None
    delivered_at: float | None = None
    history: list[HistoryEntry] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status transition to record, with the history line it adds."""

    id: str
    status: str
    at: float
    detail: str = ""
    attempts: int = 0  # total delivery attempts so far (the stored value only ever grows)
    reason: str | None = None  # replaces the stored reason when given
    escalated_at: float | None = None  # set once: the first escalation wins
    delivered_at: float | None = None


@dataclass(slots=True)
class _Pending:
    inserts: list[tuple[StoredHandoff, asyncio.Future[bool]]] = field(default_factory=list)
    changes: list[tuple[StatusChange, asyncio.Future[bool]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.changes)


class HandoffStore(ABC):
    """The outbox. `insert` and `record` return only once the row is durable."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch  # 1 turns group commit off (one transaction per row)
        self._queue: asyncio.Queue[tuple[StoredHandoff | StatusChange, asyncio.Future[bool]]]
        self._queue = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed: with `rows`, shows how well batching works
        self.rows = 0

    # -- the interface ------------------------------------------------------------------------

    async def insert(self, handoff: StoredHandoff) -> bool:
        """Store a new handoff; False if one with the same id (from, incident_id) exists."""
        return await self._submit(handoff)

    async def record(self, change: StatusChange) -> None:
        """Record a status change and its history line; durable on return."""
        await self.record_soon(change)

    def record_soon(self, change: StatusChange) -> asyncio.Future[None]:
        """Queue a change now, await its commit later (or never). Changes commit in the order
        they are queued, so a later change to the same handoff always lands after it."""
        committed = self._enqueue(change)

        def check(done: asyncio.Future[bool]) -> None:
            if result.done():
                return
            if done.exception() is not None:
                result.set_exception(done.exception())  # type: ignore[arg-type]
            elif not done.result():
                result.set_exception(StoreError(
                    f"no handoff {change.id!r} to record {change.status!r} on"))
            else:
                result.set_result(None)

        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        committed.add_done_callback(check)
        return result

    @abstractmethod
    async def get(self, handoff_id: str) -> StoredHandoff | None: ...

    @abstractmethod
    async def query(self, *, status: str | None = None, to: str | None = None,
                    limit: int = 100) -> list[StoredHandoff]: ...

    @abstractmethod
    async def unfinished(self) -> list[StoredHandoff]:
        """Every handoff neither delivered nor failed: what a restarted desk must resume."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._open()
        self._writer = asyncio.create_task(self._write_loop(), name="handoff-store-writer")

    async def close(self) -> None:
        """Commit what is queued, then close. If the closer is cancelled meanwhile, the queued
        commits still finish (shielded) but the connections are left to process exit."""
        if self._writer is not None:
            self._queue.put_nowait((_STOP, asyncio.get_running_loop().create_future()))
            try:
                await asyncio.shield(self._writer)
            except Exception:  # it already failed every waiter; closing must still close
                log.exception("handoff store writer had failed")
            self._writer = None
        await self._close()

    # -- group commit ---------------------------------------------------------------------------

    async def _submit(self, item: StoredHandoff | StatusChange) -> bool:
        # shield: a caller cancelled mid-commit must not cancel the batch for everyone else
        return await asyncio.shield(self._enqueue(item))

    def _enqueue(self, item: StoredHandoff | StatusChange) -> asyncio.Future[bool]:
        if self._writer is None or self._writer.done():
            raise StoreError("the handoff store is not open")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, done))  # unbounded: never raises QueueFull
        return done

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = _Pending()
            item, done = await self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                    done.set_result(True)
                elif isinstance(item, StatusChange):
                    batch.changes.append((item, done))
                else:
                    batch.inserts.append((item, done))
                if len(batch) >= self.max_batch or self._queue.empty():
                    break
                item, done = self._queue.get_nowait()
            if len(batch):
                await self._commit(batch)

    async def _commit(self, batch: _Pending) -> None:
        try:
            created, changed = await self._flush([h for h, _ in batch.inserts],
                                                 [c for c, _ in batch.changes])
        except Exception as exc:  # the whole transaction rolled back: fail every waiter
            log.error("handoff store commit of %d rows failed: %s", len(batch), exc)
            for _, done in (*batch.inserts, *batch.changes):
                if not done.done():
                    done.set_exception(StoreError(f"commit failed: {exc}"))
            return
        self.commits += 1
        self.rows += len(batch)
        for handoff, done in batch.inserts:
            new = handoff.id in created
            created.discard(handoff.id)  # a repeat later in the same batch is a duplicate
            if not done.done():
                done.set_result(new)
        for change, done in batch.changes:
            if not done.done():
                done.set_result(change.id in changed)

    @abstractmethod
    async def _flush(self, inserts: Sequence[StoredHandoff],
                     changes: Sequence[StatusChange]) -> tuple[set[str], set[str]]:
        """In ONE transaction: insert the new handoffs (ignoring ids that exist), then apply
        the changes in order. Return (ids inserted, ids changed)."""

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...


_STOP: Any = object()


def _new_rows(inserts: Sequence[StoredHandoff], existing: set[str]) -> list[StoredHandoff]:
    """Rows to insert: not already stored, and only the first of any id repeated in a batch."""
    seen = set(existing)
    rows = []
    for h in inserts:
        if h.id not in seen:
            seen.add(h.id)
            rows.append(h)
    return rows


def _history_json(entries: Iterable[HistoryEntry]) -> str:
    return json.dumps([e.as_json() for e in entries])


def _history(raw: Any) -> list[HistoryEntry]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [HistoryEntry(float(e["at"]), str(e["status"]), str(e.get("detail", ""))) for e in items]


# ---- SQLite ---------------------------------------------------------------------------------

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

_SQLITE_INSERT = (
    "INSERT OR IGNORE INTO handoffs (id, from_force, incident_id, to_force, priority, status, "
    "incident, accepted_at, updated_at, attempts, reason, escalated_at, delivered_at, history) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_CHANGE = (
    "UPDATE handoffs SET status = ?, updated_at = ?, attempts = MAX(attempts, ?), "
    "reason = COALESCE(?, reason), escalated_at = COALESCE(escalated_at, ?), "
    "delivered_at = COALESCE(delivered_at, ?), history = json_insert(history, '$[#]', json(?)) "
    "WHERE id = ? AND status NOT IN ('delivered', 'failed')"
)
_COLUMNS = ("id, from_force, incident_id, to_force, priority, status, incident, accepted_at, "
            "updated_at, attempts, reason, escalated_at, delivered_at, history")


def _row_to_handoff(row: Sequence[Any]) -> StoredHandoff:
    incident = row[6] if isinstance(row[6], dict) else json.loads(row[6])
    return StoredHandoff(
        id=row[0], from_force=row[1], incident_id=row[2], to_force=row[3], priority=row[4],
        status=row[5], incident=incident, accepted_at=float(row[7]), updated_at=float(row[8]),
        attempts=int(row[9]), reason=row[10], escalated_at=row[11], delivered_at=row[12],
        history=_history(row[13]),
    )


def _entry(change: StatusChange) -> HistoryEntry:
    return HistoryEntry(change.at, change.status, change.detail)


class SqliteStore(HandoffStore):
    """SQLite in WAL mode: one connection writes (the group-commit writer), one reads, so
    status queries never wait behind a commit."""

    def __init__(self, path: Path, max_batch: int = MAX_BATCH):
        super().__init__(max_batch)
        self.path = path
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write = await aiosqlite.connect(self.path, isolation_level=None)
        # FULL: the WAL is fsynced at every commit, so a 202 survives a power cut, not just a
        # crash of this process; group commit is what keeps that affordable.
        await self._write.execute("PRAGMA journal_mode=WAL")
        await self._write.execute("PRAGMA synchronous=FULL")
        await self._write.execute("PRAGMA busy_timeout=5000")
        await self._write.executescript(_SQLITE_SCHEMA)
        self._read = await aiosqlite.connect(self.path, isolation_level=None)
        await self._read.execute("PRAGMA busy_timeout=5000")

    async def _close(self) -> None:
        for conn in (self._read, self._write):
            if conn is not None:
                await conn.close()
        self._read = self._write = None

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
                rows = _new_rows(inserts, existing)
                cur = await db.executemany(_SQLITE_INSERT, [
                    (h.id, h.from_force, h.incident_id, h.to_force, h.priority, h.status,
                     json.dumps(h.incident), h.accepted_at, h.updated_at, h.attempts, h.reason,
                     h.escalated_at, h.delivered_at, _history_json(h.history)) for h in rows])
                created = {h.id for h in rows}
                if cur.rowcount != len(rows):
                    # the (from, incident_id) constraint ignored some: those are absent
                    async with db.execute(f"SELECT id FROM handoffs WHERE id IN ({marks})",
                                          ids) as cur:
                        created = {r[0] for r in await cur.fetchall()} - existing
            changed: set[str] = set()
            if changes:
                cur = await db.executemany(_SQLITE_CHANGE, [
                    (c.status, c.at, c.attempts, c.reason, c.escalated_at, c.delivered_at,
                     json.dumps(_entry(c).as_json()), c.id) for c in changes])
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
        sql = f"SELECT {_COLUMNS} FROM handoffs {where} {tail}"
        async with self._read.execute(sql, params) as cur:
            return [_row_to_handoff(tuple(r)) for r in await cur.fetchall()]

    async def get(self, handoff_id: str) -> StoredHandoff | None:
        rows = await self._select("WHERE id = ?", (handoff_id,))
        return rows[0] if rows else None

    async def query(self, *, status: str | None = None, to: str | None = None,
                    limit: int = 100) -> list[StoredHandoff]:
        where, params = _filters(status, to, "?", "?")
        return await self._select(where, [*params, limit], "ORDER BY accepted_at LIMIT ?")

    async def unfinished(self) -> list[StoredHandoff]:
        return await self._select("WHERE status NOT IN (?, ?)", TERMINAL, "ORDER BY accepted_at")


def _filters(status: str | None, to: str | None, mark1: str,
             mark2: str) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if status is not None:
        clauses.append(f"status = {mark1}")
        params.append(status)
    if to is not None:
        clauses.append(f"to_force = {mark2 if status is not None else mark1}")
        params.append(to)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# ---- PostgreSQL -----------------------------------------------------------------------------

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
"""

# the whole batch in one statement (one round trip); RETURNING names only the rows inserted
# the whole batch in one statement (one round trip); RETURNING names only the rows inserted.
# JSON travels as text (a history is itself a list, which an array parameter would unpack).
_PG_INSERT = (
    f"INSERT INTO handoffs ({_COLUMNS}) SELECT c1, c2, c3, c4, c5, c6, c7::jsonb, c8, c9, c10, "
    "c11, c12, c13, c14::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::text[], $6::text[], $7::text[], $8::float8[], $9::float8[], $10::int[], $11::text[], "
    "$12::float8[], $13::float8[], $14::text[]) "
    "AS t(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
_PG_CHANGE = (
    "UPDATE handoffs SET status = $1, updated_at = $2, attempts = GREATEST(attempts, $3), "
    "reason = COALESCE($4, reason), escalated_at = COALESCE(escalated_at, $5), "
    "delivered_at = COALESCE(delivered_at, $6), history = history || $7::jsonb "
    "WHERE id = $8 AND status NOT IN ('delivered', 'failed')"
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
            await conn.execute(_PG_SCHEMA)

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
                rows = _new_rows(inserts, set())  # ON CONFLICT cannot take one id twice
                columns = list(zip(*[
                    (h.id, h.from_force, h.incident_id, h.to_force, h.priority, h.status,
                     json.dumps(h.incident), h.accepted_at, h.updated_at, h.attempts, h.reason,
                     h.escalated_at, h.delivered_at, _history_json(h.history))
                    for h in rows], strict=True))
                created = {r["id"] for r in await conn.fetch(_PG_INSERT, *map(list, columns))}
            changed: set[str] = set()
            if changes:
                changed = {r["id"] for r in await conn.fetch(
                    "SELECT id FROM handoffs WHERE id = ANY($1::text[])",
                    list({c.id for c in changes}))}
                await conn.executemany(_PG_CHANGE, [
                    (c.status, c.at, c.attempts, c.reason, c.escalated_at, c.delivered_at,
                     [_entry(c).as_json()], c.id) for c in changes])
        return created, changed

    async def _select(self, where: str, params: Sequence[Any], tail: str = "") -> list[
            StoredHandoff]:
        assert self._pool is not None
        rows = await self._pool.fetch(f"SELECT {_COLUMNS} FROM handoffs {where} {tail}", *params)
        return [_row_to_handoff(tuple(r)) for r in rows]

    async def get(self, handoff_id: str) -> StoredHandoff | None:
        rows = await self._select("WHERE id = $1", (handoff_id,))
        return rows[0] if rows else None

    async def query(self, *, status: str | None = None, to: str | None = None,
                    limit: int = 100) -> list[StoredHandoff]:
        where, params = _filters(status, to, "$1", "$2")
        return await self._select(where, [*params, limit],
                                  f"ORDER BY accepted_at LIMIT ${len(params) + 1}")

    async def unfinished(self) -> list[StoredHandoff]:
        return await self._select("WHERE status <> ALL($1::text[])", (list(TERMINAL),),
                                  "ORDER BY accepted_at")


# ---- choosing one ---------------------------------------------------------------------------


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
