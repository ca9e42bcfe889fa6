"""The outbox interface and its group commit, whichever database is behind it.

A handoff is acknowledged to the partner only after its row is committed, so every write goes
through a *group commit*: concurrent callers queue their rows, one writer task commits
everything queued in a single transaction (one fsync) and then wakes each caller. Under load
the batch grows by itself, so throughput rises with concurrency instead of collapsing into one
fsync per request; alone, a caller waits for just its own commit.

Each row carries its status history as a JSON array appended in the same statement as the
status change, so a status and its history can never disagree.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.handoff.incident import TERMINAL

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # rows in one transaction; bounds a commit's latency under a flood
# the terminal statuses as an SQL list: a final row takes no further change
FINAL_SQL = ", ".join(f"'{status}'" for status in sorted(TERMINAL))
COLUMNS = ("id, from_force, incident_id, to_force, priority, status, incident, accepted_at, "
           "updated_at, attempts, reason, escalated_at, delivered_at, history")


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


def new_rows(inserts: Sequence[StoredHandoff], existing: set[str]) -> list[StoredHandoff]:
    """Rows to insert: not already stored, and only the first of any id repeated in a batch."""
    seen = set(existing)
    rows = []
    for h in inserts:
        if h.id not in seen:
            seen.add(h.id)
            rows.append(h)
    return rows


def history_json(entries: Iterable[HistoryEntry]) -> str:
    return json.dumps([e.as_json() for e in entries])


def history_of(raw: Any) -> list[HistoryEntry]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [HistoryEntry(float(e["at"]), str(e["status"]), str(e.get("detail", ""))) for e in items]


def row_to_handoff(row: Sequence[Any]) -> StoredHandoff:
    incident = row[6] if isinstance(row[6], dict) else json.loads(row[6])
    return StoredHandoff(
        id=row[0], from_force=row[1], incident_id=row[2], to_force=row[3], priority=row[4],
        status=row[5], incident=incident, accepted_at=float(row[7]), updated_at=float(row[8]),
        attempts=int(row[9]), reason=row[10], escalated_at=row[11], delivered_at=row[12],
        history=history_of(row[13]),
    )


def entry_of(change: StatusChange) -> HistoryEntry:
    return HistoryEntry(change.at, change.status, change.detail)


def filters(status: str | None, to: str | None, mark1: str,
            mark2: str) -> tuple[str, list[Any]]:
    """The WHERE clause of a status query, with each backend's own parameter marks."""
    clauses, params = [], []
    if status is not None:
        clauses.append(f"status = {mark1}")
        params.append(status)
    if to is not None:
        clauses.append(f"to_force = {mark2 if status is not None else mark1}")
        params.append(to)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

