"""The outbox interface and its group commit, whichever database is behind it.

A handoff is acknowledged to the partner only after its row is committed, so every write goes
through a *group commit*: concurrent callers queue their rows, one writer task commits
everything queued in a single transaction (one fsync) and then wakes each caller. Under load
the batch grows by itself, so throughput rises with concurrency instead of collapsing into one
fsync per request; alone, a caller waits for just its own commit.

Each row carries its status history as a JSON array appended in the same statement as the
status change, so a status and its history can never disagree.

One bad row must never fail its neighbours: if a batch's transaction fails, its rows are
committed again one by one, so only the row at fault fails (unless the database itself is
gone, when the rest fail at once rather than each waiting out its own timeout). Free text that
comes from outside the router (a CAD's reason or reference, in `reason` and history details)
is made storable where it enters (`storable`), so a CAD's answer cannot fail a status write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.handoff.incident import RANK, TERMINAL, UNSTORABLE

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # rows in one transaction; bounds a commit's latency under a flood
MAX_TEXT = 1000  # characters of free text kept per reason or history detail
# the terminal statuses as an SQL list: a final row takes no further change
FINAL_SQL = ", ".join(f"'{status}'" for status in sorted(TERMINAL))
COLUMNS = ("id, from_force, incident_id, to_force, priority, status, incident, accepted_at, "
           "updated_at, attempts, reason, escalated_at, delivered_at, history")
LEASE_S = 5.0  # a claim not renewed for this long is another router's to take


class StoreError(Exception):
    """The store URL is unusable, or the database refused a commit."""


def storable(text: str, limit: int = MAX_TEXT) -> str:
    """Free text as both stores can hold it: NUL and unpaired surrogates (what a CAD's
    undecodable answer may carry) become U+FFFD, and it is cut to `limit` characters."""
    text = UNSTORABLE.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float  # epoch seconds
    status: str
    detail: str = ""
    # what people said, for the statuses they cause: `by`, `cause`, `outcome`, `note`,
    # `reference`, `to` (where a rejected handoff went next)
    data: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "status": self.status, "detail": self.detail, **self.data}


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
    data: dict[str, str] = field(default_factory=dict)  # for the history line
    to_force: str | None = None  # offered to another destination: to be delivered again


@dataclass(frozen=True, slots=True)
class Need:
    """Which handoffs need a router: every one not final and not yet delivered, and those
    delivered since `awaiting_since`, with a deadline for a dispatcher's answer (`awaited`
    priorities), that nobody has answered yet."""

    awaiting_since: float
    awaited: tuple[str, ...]


@dataclass(slots=True)
class _Pending:
    inserts: list[tuple[StoredHandoff, asyncio.Future[bool]]] = field(default_factory=list)
    changes: list[tuple[StatusChange, asyncio.Future[bool]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.changes)


class HandoffStore(ABC):
    """The outbox, and the queue routers deliver from. `insert` and `record` return only once
    the row is durable.

    Every unfinished handoff is *claimed* by one router (`owner`) for `lease_s`, so that one
    router, and only one, delivers it and watches its deadlines. A router claims what it
    accepts (`insert`) and what it sends on to the next partner (a change with `to_force`),
    renews its claims while it lives (`renew`), takes any claim left to expire (`claim`: a
    dead router's), and gives its claims up when it stops (`release`). Leases are timed by the
    database's clock, so routers' clocks need not agree."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch  # 1 turns group commit off (one transaction per row)
        self.owner = "router"  # this router's name (router/infra/instance.py)
        self.lease_s = LEASE_S
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
    async def claim(self, need: Need, *, limit: int, mine: bool = False) -> list[StoredHandoff]:
        """Claim up to `limit` handoffs that `need` a router and that nobody holds (never
        claimed, or the claim expired), P1 first, then oldest. `mine`, at start: also those
        held under this router's own name before a restart (on SQLite, one router to a file:
        every one)."""

    @abstractmethod
    async def renew(self, ids: Sequence[str], need: Need) -> set[str]:
        """Extend this router's claims on `ids`; return those it still holds and that still
        need it (the rest were taken over, answered or finished elsewhere)."""

    @abstractmethod
    async def release(self) -> None:
        """Give up every claim this router holds, so others take them at once."""

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
        self._queue.put_nowait((_storable(item), done))  # unbounded: never raises QueueFull
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
            created, changed = await self._flush_pending(batch)
        except Exception as exc:  # the whole transaction rolled back
            if len(batch) == 1:
                log.error("handoff store commit failed: %s", exc)
                _fail(batch, exc)
            else:
                log.warning("handoff store commit of %d rows failed (%s); committing them "
                            "one by one", len(batch), exc)
                await self._commit_singly(batch)
            return
        self._settle(batch, created, changed)

    async def _flush_pending(self, batch: _Pending) -> tuple[set[str], set[str]]:
        return await self._flush([h for h, _ in batch.inserts], [c for c, _ in batch.changes])

    def _settle(self, batch: _Pending, created: set[str], changed: set[str]) -> None:
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

    async def _commit_singly(self, batch: _Pending) -> None:
        """Each row of a failed batch in its own transaction, in the batch's order (inserts,
        then changes), so only a row at fault fails. An error that is not a row's fault means
        the database is failing: every row left fails with it at once."""
        singles = [_Pending(inserts=[i]) for i in batch.inserts] + [
            _Pending(changes=[c]) for c in batch.changes]
        for n, single in enumerate(singles):
            try:
                created, changed = await self._flush_pending(single)
            except Exception as exc:
                if not self.row_fault(exc):
                    log.error("handoff store commit failed: %s; failing the %d rows left",
                              exc, len(singles) - n)
                    for rest in singles[n:]:
                        _fail(rest, exc)
                    return
                row = single.inserts[0][0] if single.inserts else single.changes[0][0]
                log.error("handoff store refused a row of handoff %s: %s", row.id, exc)
                _fail(single, exc)
                continue
            self._settle(single, created, changed)

    def row_fault(self, exc: Exception) -> bool:
        """Whether `exc` is a row's own fault (its content), not the database's."""
        return isinstance(exc, (ValueError, TypeError, OverflowError))

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


def _fail(batch: _Pending, exc: Exception) -> None:
    for _, done in (*batch.inserts, *batch.changes):
        if not done.done():
            done.set_exception(StoreError(f"commit failed: {exc}"))


def _storable(item: StoredHandoff | StatusChange) -> StoredHandoff | StatusChange:
    """The item with its free text made storable (a copy, only when something changes)."""
    if isinstance(item, StatusChange):
        if (_clean(item.detail) and (item.reason is None or _clean(item.reason))
                and all(_clean(v) for v in item.data.values())):
            return item
        reason = None if item.reason is None else storable(item.reason)
        return dataclasses.replace(item, detail=storable(item.detail), reason=reason,
                                   data={k: storable(v) for k, v in item.data.items()})
    if _clean(item.reason) and all(_clean(e.detail) for e in item.history):
        return item
    return dataclasses.replace(item, reason=storable(item.reason), history=[
        dataclasses.replace(e, detail=storable(e.detail)) for e in item.history])


def _clean(text: str) -> bool:
    return len(text) <= MAX_TEXT and not UNSTORABLE.search(text)


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
    return [HistoryEntry(float(e["at"]), str(e["status"]), str(e.get("detail", "")),
                         {k: str(v) for k, v in e.items() if k not in _ENTRY_KEYS})
            for e in items]


_ENTRY_KEYS = frozenset({"at", "status", "detail"})


def row_to_handoff(row: Sequence[Any]) -> StoredHandoff:
    incident = row[6] if isinstance(row[6], dict) else json.loads(row[6])
    return StoredHandoff(
        id=row[0], from_force=row[1], incident_id=row[2], to_force=row[3], priority=row[4],
        status=row[5], incident=incident, accepted_at=float(row[7]), updated_at=float(row[8]),
        attempts=int(row[9]), reason=row[10], escalated_at=row[11], delivered_at=row[12],
        history=history_of(row[13]),
    )


def entry_of(change: StatusChange) -> HistoryEntry:
    return HistoryEntry(change.at, change.status, change.detail, change.data)


def need_sql(since: str, awaited: str) -> str:
    """The rows that need a router (see `Need`), with each backend's parameter marks; the
    awaited priorities are one parameter (a text array, or a JSON list in SQLite)."""
    return (f"status NOT IN ({FINAL_SQL}) AND (delivered_at IS NULL OR (status IN "
            f"('delivered', 'escalated') AND delivered_at >= {since} AND priority IN "
            f"{awaited}))")


def by_urgency(rows: list[StoredHandoff]) -> list[StoredHandoff]:
    """P1 first, then oldest: the order a claim is taken and delivered in."""
    return sorted(rows, key=lambda h: (RANK.get(h.priority, len(RANK)), h.accepted_at, h.id))


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

