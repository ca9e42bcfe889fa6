"""Which router leads, among several sharing one database: a lease in the store's database.

Some duties must be done once, not once per router: the retained MQTT state and routing
messages, and diversion alerts to partners (router/watch/publisher.py). The leader holds a
row in `leases` (`LEASE_S`, renewed every `EVERY_S`, timed by the database's clock); when it
dies, another router takes the lease once it has expired, so duties resume within
LEASE_S + EVERY_S (4 s). A clean stop gives the lease up at once. Per-handoff duties
(delivery, deadlines, escalation sheets, telling the sender) need no leader: they follow each
handoff's claim (router/handoff/claims.py).

When the database cannot be reached for longer than a lease, every router that cannot reach it
leads: in a 999 system a partner told twice is better than a partner not told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import aiosqlite
import asyncpg

from router.infra import metrics

log = logging.getLogger(__name__)

LEASE_S = 3.0
EVERY_S = 1.0
TIMEOUT_S = 2.0  # for each statement, and to connect
NAME = "leader"

_SCHEMA = ("CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
           "expires DOUBLE PRECISION NOT NULL)")
# taken when free or expired, renewed when held; a row comes back only to its holder
_TAKE = ("INSERT INTO leases (name, holder, expires) VALUES ({name}, {holder}, {now} + {lease}) "
         "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
         "WHERE leases.holder = excluded.holder OR leases.expires < {now} RETURNING holder")
_GIVE_UP = "DELETE FROM leases WHERE name = {name} AND holder = {holder}"

Changed = Callable[[bool], None]


class Lease(ABC):
    """One backend's statements; each raises on any failure."""

    @abstractmethod
    async def take(self, holder: str) -> bool: ...

    @abstractmethod
    async def give_up(self, holder: str) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


class Leadership:
    """`leading`: whether this router does the singleton duties now; `on_change` hears it."""

    def __init__(self, url: str, holder: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.holder = holder
        self.lease: Lease = SqliteLease(url) if url.startswith("sqlite:///") else PgLease(url)
        self.clock = clock
        self.leading = False
        self._listeners: list[Changed] = []
        self._last_contact = clock()  # the database last answered (or we started)

    def on_change(self, listener: Changed) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        """Take or renew the lease every EVERY_S; on cancellation give it up."""
        try:
            while True:
                self._set(await self._round())
                await asyncio.sleep(EVERY_S)
        finally:
            if self.leading:
                self._set(False)
                await self._give_up()
            await self.lease.close()

    async def _round(self) -> bool:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                held = await self.lease.take(self.holder)
        except Exception as exc:  # the database is away: see the module's last paragraph
            alone = self.clock() - self._last_contact > LEASE_S
            if alone and not self.leading:
                log.error("leader's lease unreachable for over %.0f s (%s): leading, as other "
                          "routers may not be able to", LEASE_S, exc or type(exc).__name__)
            return self.leading or alone
        self._last_contact = self.clock()
        return held

    async def _give_up(self) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await self.lease.give_up(self.holder)
        except Exception as exc:
            log.warning("leader's lease not given up (%s): it expires in %.0f s", exc, LEASE_S)

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)
        log.warning("%s %s the leader", self.holder, "is now" if leading else "is no longer")
        for listener in self._listeners:
            try:
                listener(leading)
            except Exception:
                log.exception("leadership listener failed")


class SqliteLease(Lease):
    """One router to a file, normally: the lease is then always its own."""

    def __init__(self, url: str) -> None:
        self.path = Path(url.removeprefix("sqlite:///"))
        self._db: aiosqlite.Connection | None = None

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
            await db.execute("PRAGMA busy_timeout=1000")
            await db.execute(_SCHEMA)
            self._db = db
        return self._db

    async def take(self, holder: str) -> bool:
        db = await self._conn()
        sql = _TAKE.format(name="?", holder="?", now="?", lease="?")
        now = time.time()
        async with db.execute(sql, (NAME, holder, now, LEASE_S, now)) as cur:
            return await cur.fetchone() is not None

    async def give_up(self, holder: str) -> None:
        db = await self._conn()
        await db.execute(_GIVE_UP.format(name="?", holder="?"), (NAME, holder))

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()


class PgLease(Lease):
    NOW = "extract(epoch FROM clock_timestamp())::float8"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=TIMEOUT_S,
                                         command_timeout=TIMEOUT_S)
            try:  # the lock: routers starting together must not race to create the table
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(7242003)")
                    await conn.execute(_SCHEMA)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def take(self, holder: str) -> bool:
        conn = await self._connection()
        try:
            row = await conn.fetchrow(
                _TAKE.format(name="$1", holder="$2", now=self.NOW, lease="$3"),
                NAME, holder, LEASE_S)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            conn.terminate()  # connect afresh next round
            self._conn = None
            raise
        return row is not None

    async def give_up(self, holder: str) -> None:
        conn = await self._connection()
        await conn.execute(_GIVE_UP.format(name="$1", holder="$2"), NAME, holder)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()
