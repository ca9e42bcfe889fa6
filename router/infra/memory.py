"""What the router must remember across a restart or a crash, and share with other routers on
the same database: managers' declarations, and each centre's last known state.

One small table, `operational_state (key, value JSON, updated_at)`, in the database the handoff
store uses (`handoff.store`: SQLite for one router, PostgreSQL for several). Keys:
`declaration/{force}` (the override as declared, with wall-clock times; absent when none) and
`centre/{force}` (the state last seen, with when). On PostgreSQL every write is announced with
`NOTIFY overflow_state, key`, and each router LISTENs, so a declaration made on one applies on
all within moments.

Routing never waits on this: a write that fails is logged, counted and retried later by whoever
calls again; a database that cannot be opened leaves the router running on what it knows
(`available` is False) while `keep_open` retries in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from router.infra import metrics

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0  # for every statement: a slow database must not hold a declaration long
CHANNEL = "overflow_state"
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between attempts to open, then every 30 s

Changed = Callable[[str], None]  # a key another router wrote

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operational_state (
    key TEXT PRIMARY KEY,
    value TEXT,
    updated_at DOUBLE PRECISION NOT NULL
)
"""


class Unremembered(Exception):
    """The database refused or could not be reached: the change holds in memory only."""


class Memory(ABC):
    """Durable keys, JSON values. Every call has a timeout; failures raise Unremembered."""

    CHECK_S = 5.0  # how often `keep_open` looks whether the database is still there

    def __init__(self) -> None:
        self.available = False
        self._changed: list[Changed] = []

    def on_change(self, callback: Changed) -> None:
        """Hear of keys other routers write (PostgreSQL only; SQLite has one router)."""
        self._changed.append(callback)

    async def put(self, key: str, value: dict[str, Any] | None) -> None:
        """Store (or, with None, delete) a key durably before returning."""
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await self._put(key, None if value is None else json.dumps(value), time.time())
        except (OSError, TimeoutError, asyncpg.PostgresError, aiosqlite.Error) as exc:
            metrics.MEMORY_WRITES.labels("failed").inc()
            self.available = self._still_there(exc)
            raise Unremembered(f"could not remember {key}: {exc or type(exc).__name__}") from exc
        metrics.MEMORY_WRITES.labels("ok").inc()

    async def items(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every key under `prefix`, without the prefix."""
        try:
            async with asyncio.timeout(TIMEOUT_S):
                rows = await self._items(prefix)
        except (OSError, TimeoutError, asyncpg.PostgresError, aiosqlite.Error) as exc:
            raise Unremembered(f"could not read {prefix}*: {exc or type(exc).__name__}") from exc
        out = {}
        for key, value in rows:
            try:
                out[key.removeprefix(prefix)] = json.loads(value)
            except (TypeError, ValueError):
                log.error("operational state %s is not JSON; ignored", key)
        return out

    async def keep_open(self, opened: Callable[[], None]) -> None:
        """Open the database, retrying with backoff, and open it again whenever it is lost;
        `opened()` after each (re)opening, so what changed meanwhile is read again. Run in a
        task for the service's life: the router serves meanwhile on what it knows."""
        attempt = 0
        while True:
            if self.available:
                await asyncio.sleep(self.CHECK_S)
                continue
            try:
                await self.close()
                async with asyncio.timeout(TIMEOUT_S * 3):
                    await self._open()
            except (OSError, TimeoutError, asyncpg.PostgresError, aiosqlite.Error) as exc:
                wait = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                attempt += 1
                log.error("operational state store unavailable (%s); declarations are kept "
                          "in memory only; retrying in %.0f s", exc or type(exc).__name__, wait)
                await asyncio.sleep(wait)
                continue
            attempt = 0
            self.available = True
            metrics.MEMORY_AVAILABLE.set(1)
            log.info("operational state store open")
            opened()

    def _still_there(self, exc: BaseException) -> bool:
        """After a failed statement: a lost connection makes `keep_open` open it again."""
        if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError,
                            asyncpg.PostgresConnectionError)):
            metrics.MEMORY_AVAILABLE.set(0)
            return False
        return self.available

    def _heard(self, key: str) -> None:
        for callback in self._changed:
            try:
                callback(key)
            except Exception:
                log.exception("operational state listener failed on %s", key)

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _put(self, key: str, value: str | None, at: float) -> None: ...

    @abstractmethod
    async def _items(self, prefix: str) -> list[tuple[str, str]]: ...


class SqliteMemory(Memory):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _put(self, key: str, value: str | None, at: float) -> None:
        if self._db is None:
            raise aiosqlite.Error("not open")
        if value is None:
            await self._db.execute("DELETE FROM operational_state WHERE key = ?", (key,))
        else:
            await self._db.execute(
                "INSERT INTO operational_state (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at", (key, value, at))

    async def _items(self, prefix: str) -> list[tuple[str, str]]:
        if self._db is None:
            raise aiosqlite.Error("not open")
        async with self._db.execute(
                "SELECT key, value FROM operational_state WHERE substr(key, 1, ?) = ?",
                (len(prefix), prefix)) as cur:
            return [(str(k), str(v)) for k, v in await cur.fetchall()]


class PostgresMemory(Memory):
    """A small pool for writes and reads, and one connection that LISTENs."""

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None

    async def _open(self) -> None:
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=TIMEOUT_S,
                                         command_timeout=TIMEOUT_S)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(7242002)")
                await conn.execute(_SCHEMA)
            listener = await asyncpg.connect(self.dsn, timeout=TIMEOUT_S)
            await listener.add_listener(CHANNEL, self._notified)
            listener.add_termination_listener(self._lost)
        except BaseException:
            await pool.close()
            raise
        self._pool, self._listener = pool, listener

    def _notified(self, conn: Any, pid: int, channel: str, key: str) -> None:
        self._heard(key)  # our own writes too: applying what is already so changes nothing

    def _lost(self, conn: Any) -> None:
        if conn is not self._listener:  # closed by us
            return
        log.error("operational state: the LISTEN connection is gone; other routers' "
                  "declarations are read again once it is back")
        self.available = False
        metrics.MEMORY_AVAILABLE.set(0)

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close(timeout=TIMEOUT_S)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.wait_for(pool.close(), TIMEOUT_S)

    async def _put(self, key: str, value: str | None, at: float) -> None:
        if self._pool is None:
            raise OSError("not open")
        async with self._pool.acquire() as conn, conn.transaction():
            if value is None:
                await conn.execute("DELETE FROM operational_state WHERE key = $1", key)
            else:
                await conn.execute(
                    "INSERT INTO operational_state (key, value, updated_at) VALUES ($1, $2, $3) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at", key, value, at)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, key)

    async def _items(self, prefix: str) -> list[tuple[str, str]]:
        if self._pool is None:
            raise OSError("not open")
        rows = await self._pool.fetch(
            "SELECT key, value FROM operational_state WHERE starts_with(key, $1)", prefix)
        return [(r["key"], r["value"]) for r in rows]


def memory_for(url: str) -> Memory:
    """The same URL as `handoff.store`."""
    if url.startswith("sqlite:///"):
        return SqliteMemory(Path(url.removeprefix("sqlite:///")))
    return PostgresMemory(url)
