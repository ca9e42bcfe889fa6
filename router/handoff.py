"""Incident handoffs: accept, store durably, deliver to the destination's CAD, escalate.

A partner force that answered another force's diverted call logs the incident and hands it
back to the home force through `POST /v1/handoffs`. The desk:

- validates the incident at the edge (`Incident`) and stores it before saying yes (202), keyed
  by `(from, incident_id)` so a partner's retry is recognised (200, same handoff);
- delivers each destination's backlog in priority order (P1 first, then oldest), at least once,
  with the handoff id as idempotency key so the CAD sees it once; attempts are retried with
  exponential backoff and jitter (tenacity), each bounded by a timeout; a permanent refusal
  makes it `failed` with the CAD's reason;
- holds a destination's backlog (`held`) while its CAD is down, then drains it with at most
  `handoff.max_concurrency` deliveries in flight per destination, so a CAD coming back is not
  stampeded;
- escalates a handoff that misses its priority's deadline: status `escalated` (it still keeps
  trying), an alert through the injected callback, the metric, and a printable sheet.

Status history is recorded with every change (router/store.py). After a restart the desk
resumes every unfinished handoff from the store; one interrupted mid-delivery is delivered
again with the same key, which is what makes "exactly once" hold at the CAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from adapters import base as adapters
from adapters.base import Ack, Adapter, AdapterContext, AdapterUnavailable, Delivery, Refusal
from router import metrics
from router.config import FORCE_ID, Handoff, RouterConfig
from router.model import Service
from router.sheets import Sheet, write_sheet
from router.store import HandoffStore, HistoryEntry, StatusChange, StoredHandoff, open_store

log = logging.getLogger(__name__)

Priority = Literal["P1", "P2", "P3", "P4"]
RANK: Mapping[str, int] = {"P1": 0, "P2": 1, "P3": 2, "P4": 3}
ID_NAMESPACE = uuid.UUID("0d3c6f0e-6a43-5b8e-9a51-2f1f0c6f7e21")
MAX_IDLE_S = 1.0  # a closed destination re-checks its CAD at least this often
Alert = Callable[[dict[str, Any]], None]
CadUp = Callable[[str], bool]

# ---- the incident, as the contract defines it -----------------------------------------------

Text = Annotated[str, Field(min_length=1, max_length=200)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Part):
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    address: Annotated[str, Field(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _somewhere(self) -> Location:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon go together")
        if self.lat is None and self.address is None:
            raise ValueError("a location needs lat and lon, or an address")
        return self


class Caller(_Part):
    name: Annotated[str, Field(max_length=200)] | None = None
    phone: Annotated[str, Field(max_length=32, pattern=r"^[0-9+() -]*$")] | None = None


class Incident(_Part):
    """The contract's incident handoff JSON (EIDO-inspired). `from` is a Python keyword,
    hence the alias."""

    incident_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
    from_: Annotated[str, Field(alias="from", pattern=FORCE_ID)]
    to: Annotated[str, Field(pattern=FORCE_ID)]
    priority: Priority
    service: Service
    call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    opened_at: AwareDatetime
    location: Location
    category: Text
    summary: Annotated[str, Field(min_length=1, max_length=4000)]
    caller: Caller | None = None

    @model_validator(mode="after")
    def _elsewhere(self) -> Incident:
        if self.from_ == self.to:
            raise ValueError("to: a force does not hand an incident to itself")
        return self

    def contract_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Status(StrEnum):
    ACCEPTED = "accepted"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    HELD = "held"
    ESCALATED = "escalated"
    FAILED = "failed"


TERMINAL = frozenset({Status.DELIVERED, Status.FAILED})


def handoff_id(from_force: str, incident_id: str) -> str:
    """Deterministic, URL-safe: the same (from, incident_id) always names the same handoff,
    which is also the idempotency key the destination CAD sees."""
    return uuid.uuid5(ID_NAMESPACE, f"{from_force}\n{incident_id}").hex


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def handoff_json(h: StoredHandoff) -> dict[str, Any]:
    """The API's view of one handoff, history included."""
    out: dict[str, Any] = {
        "id": h.id, "incident_id": h.incident_id, "from": h.from_force, "to": h.to_force,
        "priority": h.priority, "status": h.status, "attempts": h.attempts,
        "accepted_at": _iso(h.accepted_at), "updated_at": _iso(h.updated_at),
    }
    if h.reason:
        out["reason"] = h.reason
    if h.escalated_at is not None:
        out["escalated_at"] = _iso(h.escalated_at)
    if h.delivered_at is not None:
        out["delivered_at"] = _iso(h.delivered_at)
    out["incident"] = h.incident
    out["history"] = [{"at": _iso(e.at), "status": e.status, **({"detail": e.detail}
                                                                  if e.detail else {})}
                      for e in h.history]
    return out


class UnknownDestination(ValueError):
    pass


# ---- the desk -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Live:
    """An unfinished handoff, as the workers track it in memory."""

    id: str
    to: str
    priority: str
    accepted_at: float
    incident: dict[str, Any]
    status: Status
    attempts: int = 0
    escalated: bool = False
    reason: str = ""
    done: bool = False  # its final status is being written: escalation must leave it alone

    @property
    def order(self) -> tuple[int, float, str]:
        return RANK[self.priority], self.accepted_at, self.id


@dataclass(slots=True)
class _Destination:
    force: str
    adapter: Adapter
    slots: asyncio.Semaphore
    queue: list[tuple[tuple[int, float, str], _Live]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    suspended_until: float | None = None  # set after retries run out: hold and probe
    unfinished: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while unfinished == 0

    def push(self, item: _Live) -> None:
        heapq.heappush(self.queue, (item.order, item))
        self.wake.set()

    def pop(self) -> _Live:
        return heapq.heappop(self.queue)[1]

    async def changed(self, within_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within_s, 0.0)):
                await self.wake.wait()
        self.wake.clear()


class HandoffDesk:
    """Accepts, stores, delivers and escalates handoffs. Run `run()` in a task (open_desk
    does); `submit`, `get`, `query` and `cad_state_changed` may be called meanwhile."""

    def __init__(self, settings: Handoff, store: HandoffStore, adapters_by_force: Mapping[
            str, Adapter], *, alert: Alert, cad_up: CadUp, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.alert = alert
        self.cad_up = cad_up
        self.clock = clock
        self.spool_dir = Path(settings.spool_dir)
        self._deadline_s: dict[str, float] = {str(k): v for k, v in settings.deadlines_s.items()}
        self._dests = {force: _Destination(force, adapter, asyncio.Semaphore(
            settings.max_concurrency)) for force, adapter in adapters_by_force.items()}
        self._live: dict[str, _Live] = {}
        for dest in self._dests.values():
            dest.idle.set()
        self._deadlines: list[tuple[float, str]] = []
        self._deadline_wake = asyncio.Event()

    # -- the API's side -------------------------------------------------------------------------

    async def submit(self, incident: Incident) -> tuple[dict[str, Any], bool]:
        """Store the incident durably; (handoff JSON, True) if new, (existing, False) if not."""
        dest = self._dests.get(incident.to)
        if dest is None:
            raise UnknownDestination(f"to: unknown force {incident.to!r}")
        now = self.clock()
        hid = handoff_id(incident.from_, incident.incident_id)
        history = [HistoryEntry(now, Status.ACCEPTED, f"from {incident.from_}")]
        status = Status.ACCEPTED
        if not self._open(dest):
            status = Status.HELD
            history.append(HistoryEntry(now, status, "destination CAD unavailable"))
        record = StoredHandoff(
            id=hid, from_force=incident.from_, incident_id=incident.incident_id,
            to_force=incident.to, priority=incident.priority, status=status,
            incident=incident.contract_json(), accepted_at=now, updated_at=now, history=history)
        if await self.store.insert(record):
            for entry in history:
                metrics.HANDOFF_OUTCOMES.labels(incident.to, entry.status).inc()
            self._track(_Live(hid, incident.to, incident.priority, now, record.incident, status))
            return handoff_json(record), True
        existing = await self.store.get(hid)
        if existing is None:  # cannot happen: the insert found it
            raise RuntimeError(f"handoff {hid} vanished")
        return handoff_json(existing), False

    async def get(self, hid: str) -> dict[str, Any] | None:
        found = await self.store.get(hid)
        return handoff_json(found) if found else None

    async def query(self, *, status: Status | None = None, to: str | None = None,
                    limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.store.query(status=status, to=to, limit=limit)
        return [handoff_json(h) for h in rows]

    def backlog(self) -> dict[str, int]:
        """Unfinished handoffs per destination (queued or in flight)."""
        return {force: dest.unfinished for force, dest in self._dests.items()}

    async def drained(self, force: str) -> None:
        """Return once nothing is left to deliver to `force` (for tests and benchmarks)."""
        await self._dests[force].idle.wait()

    def cad_state_changed(self, force: str, up: bool) -> None:
        """The health watcher's word: a CAD back up ends any hold at once."""
        dest = self._dests.get(force)
        if dest is None:
            return
        if up:
            dest.suspended_until = None
        dest.wake.set()

    # -- running --------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Load every unfinished handoff from the store (after a restart); returns how many."""
        rows = await self.store.unfinished()
        for h in rows:
            if h.to_force not in self._dests:
                log.error("handoff %s is for %r, no longer configured; left as is", h.id,
                          h.to_force)
                continue
            self._track(_Live(h.id, h.to_force, h.priority, h.accepted_at, h.incident,
                              Status(h.status), h.attempts, h.escalated_at is not None,
                              h.reason))
        if rows:
            log.info("resumed %d unfinished handoffs", len(rows))
        return len(rows)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._escalator(), name="handoff-escalator")
            for dest in self._dests.values():
                tg.create_task(self._worker(dest), name=f"handoff-worker-{dest.force}")

    def _open(self, dest: _Destination) -> bool:
        return dest.suspended_until is None and self.cad_up(dest.force)

    def _track(self, item: _Live) -> None:
        self._live[item.id] = item
        dest = self._dests[item.to]
        dest.unfinished += 1
        dest.idle.clear()
        metrics.HANDOFF_BACKLOG.labels(item.to, item.priority).inc()
        dest.push(item)
        limit = self._deadline_s.get(item.priority)
        if not item.escalated and limit is not None:
            heapq.heappush(self._deadlines, (item.accepted_at + limit, item.id))
            self._deadline_wake.set()

    def _finish(self, item: _Live) -> None:
        if self._live.pop(item.id, None) is not None:
            dest = self._dests[item.to]
            dest.unfinished -= 1
            if not dest.unfinished:
                dest.idle.set()
            metrics.HANDOFF_BACKLOG.labels(item.to, item.priority).dec()

    async def _change(self, item: _Live, status: Status, detail: str, *,
                      reason: str | None = None, **stamps: float) -> None:
        await self._change_soon(item, status, detail, reason=reason, **stamps)

    def _change_soon(self, item: _Live, status: Status, detail: str, *,
                     reason: str | None = None, **stamps: float) -> asyncio.Future[None]:
        """Queue a status change (commits in queue order); await the result for durability."""
        committed = self.store.record_soon(StatusChange(
            item.id, status, self.clock(), detail, item.attempts, reason, **stamps))
        item.status = status
        metrics.HANDOFF_OUTCOMES.labels(item.to, status).inc()
        return committed

    # -- delivery -------------------------------------------------------------------------------

    async def _worker(self, dest: _Destination) -> None:
        probe_every = self.settings.retry.hold_probe_s
        async with asyncio.TaskGroup() as tg:
            while True:
                if not dest.queue:
                    await dest.changed(MAX_IDLE_S)
                    continue
                if not self._open(dest):
                    await self._hold_queued(dest)
                    due = dest.suspended_until
                    if due is not None and self.clock() >= due and self.cad_up(dest.force):
                        # half-open: one handoff, one attempt; success reopens the gate
                        dest.suspended_until = self.clock() + probe_every
                        await dest.slots.acquire()
                        await self._deliver(dest, dest.pop(), attempts=1)
                        continue
                    wait = MAX_IDLE_S if due is None else min(due - self.clock(), MAX_IDLE_S)
                    await dest.changed(wait)
                    continue
                await dest.slots.acquire()
                if not dest.queue or not self._open(dest):
                    dest.slots.release()
                    continue
                tg.create_task(self._deliver(dest, dest.pop()))

    async def _hold_queued(self, dest: _Destination) -> None:
        """Say so in each waiting handoff's status: the CAD is unavailable."""
        waiting = [item for _, item in dest.queue
                   if not item.escalated and item.status in (Status.ACCEPTED, Status.DELIVERING)]
        if waiting:
            await asyncio.gather(*(self._change(item, Status.HELD, "destination CAD unavailable")
                                   for item in waiting))

    async def _deliver(self, dest: _Destination, item: _Live, attempts: int | None = None) -> None:
        """One handoff to its CAD, retried. The destination's slot is freed as soon as the CAD
        has answered: the bound protects the CAD, and our own commit need not hold it."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                dest.slots.release()

        try:
            started = None
            if not item.escalated and item.status != Status.DELIVERING:
                # not awaited before sending: if we crash first, nothing differs (the handoff
                # is delivered again on restart either way), and it keeps a commit off the path
                started = self._change_soon(item, Status.DELIVERING, f"to {dest.force}'s CAD")
            try:
                outcome = await self._attempt(dest, item, attempts or
                                              self.settings.retry.attempts)
            except AdapterUnavailable as exc:
                release()
                item.reason = str(exc)
                if dest.suspended_until is None:
                    log.warning("%s's CAD unavailable (%s): holding its backlog", dest.force, exc)
                dest.suspended_until = self.clock() + self.settings.retry.hold_probe_s
                if started is not None:
                    await started
                if not item.escalated:
                    await self._change(item, Status.HELD, f"CAD unavailable: {exc}",
                                       reason=item.reason)
                dest.push(item)
                return
            finally:
                release()
            if started is not None:
                await started
            item.done = True
            if isinstance(outcome, Refusal):
                await self._change(item, Status.FAILED, f"refused: {outcome.reason}",
                                   reason=outcome.reason)
                self._finish(item)
            else:
                await self._delivered(dest, item, outcome)
            if dest.suspended_until is not None:
                log.info("%s's CAD answers again: draining its backlog", dest.force)
                dest.suspended_until = None
                dest.wake.set()
        except Exception as exc:  # the store failed: keep the handoff, try again later
            log.error("handoff %s: %s; will retry", item.id, exc)
            item.done = False
            if item.id in self._live:
                dest.suspended_until = self.clock() + self.settings.retry.hold_probe_s
                dest.push(item)
        finally:
            release()

    async def _attempt(self, dest: _Destination, item: _Live, attempts: int) -> Ack | Refusal:
        retry = self.settings.retry
        delivery = Delivery(item.id, item.incident)
        async for attempt in AsyncRetrying(
                stop=stop_after_attempt(attempts),
                # jitter of one initial step spreads a destination's retries apart
                wait=wait_exponential(multiplier=retry.initial_s, max=retry.max_s)
                + wait_random(0, retry.initial_s),
                retry=retry_if_exception_type(AdapterUnavailable), reraise=True):
            with attempt:
                item.attempts += 1
                try:
                    async with asyncio.timeout(retry.attempt_timeout_s):
                        return await dest.adapter.deliver(delivery)
                except TimeoutError as exc:
                    raise AdapterUnavailable(
                        f"no answer within {retry.attempt_timeout_s:g}s") from exc
                except AdapterUnavailable:
                    raise
                except Exception as exc:  # an adapter bug must not take the desk down
                    log.exception("adapter for %s raised", dest.force)
                    raise AdapterUnavailable(f"adapter error: {exc!r}") from exc
        raise AssertionError("tenacity stops by raising")  # pragma: no cover

    async def _delivered(self, dest: _Destination, item: _Live, ack: Ack) -> None:
        now = self.clock()
        detail = "acknowledged by the CAD" + (f" as {ack.reference}" if ack.reference else "")
        if ack.duplicate:
            detail += " (it already had it)"
        await self._change(item, Status.DELIVERED, detail, delivered_at=now)
        metrics.HANDOFF_DELIVERY_SECONDS.labels(dest.force).observe(max(now - item.accepted_at,
                                                                         0.0))
        self._finish(item)

    # -- escalation -----------------------------------------------------------------------------

    async def _escalator(self) -> None:
        while True:
            now = self.clock()
            due = []
            while self._deadlines and self._deadlines[0][0] <= now:
                _, hid = heapq.heappop(self._deadlines)
                item = self._live.get(hid)
                if item is not None and not item.escalated and not item.done:
                    due.append(item)
            if due:
                await asyncio.gather(*(self._escalate(item) for item in due))
            wait = self._deadlines[0][0] - now if self._deadlines else MAX_IDLE_S
            self._deadline_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait, 0.0), MAX_IDLE_S)):
                    await self._deadline_wake.wait()

    async def _escalate(self, item: _Live) -> None:
        if item.done or item.id not in self._live:
            return
        now = self.clock()
        item.escalated = True
        deadline = self._deadline_s[item.priority]
        before = item.status
        try:
            await self._change(item, Status.ESCALATED,
                               f"not delivered within the {item.priority} deadline of "
                               f"{deadline:g}s (was {before})", escalated_at=now)
            html_path, csv_path = await asyncio.to_thread(write_sheet, self.spool_dir, Sheet(
                item.id, item.incident, item.accepted_at, now, str(before), item.reason))
        except Exception as exc:
            log.error("escalating handoff %s: %s", item.id, exc)
            html_path = csv_path = Path()
        alert = {
            "kind": "handoff_escalated", "handoff_id": item.id,
            "incident_id": item.incident.get("incident_id"), "from": item.incident.get("from"),
            "to": item.to, "priority": item.priority, "deadline_s": deadline,
            "age_s": round(now - item.accepted_at, 3), "delivery": str(before),
            "reason": item.reason, "at": _iso(now),
            "sheet": str(html_path) if html_path.name else None,
            "csv": str(csv_path) if csv_path.name else None,
        }
        try:
            self.alert(alert)
        except Exception:
            log.exception("escalation alert callback failed")


# ---- assembly -------------------------------------------------------------------------------


def build_adapters(config: RouterConfig) -> dict[str, Adapter]:
    """One adapter per force, its options validated now (raises AdapterConfigError)."""
    spool = Path(config.handoff.spool_dir)
    built = {}
    problems = []
    for force, spec in config.forces.items():
        try:
            built[force] = adapters.build(spec.cad.adapter, spec.cad.options,
                                          AdapterContext(force, spool))
        except adapters.AdapterConfigError as exc:
            problems.append(f"forces.{force}.cad: {exc}")
    if problems:
        raise adapters.AdapterConfigError("\n".join(problems))
    return built


@contextlib.asynccontextmanager
async def open_desk(config: RouterConfig, *, alert: Alert, cad_up: CadUp,
                    clock: Callable[[], float] = time.time) -> AsyncIterator[HandoffDesk]:
    """Open the store and adapters, resume unfinished handoffs, run the workers; on exit
    (normal, error or cancellation) stop the workers, then commit and close everything."""
    built = build_adapters(config)  # before any I/O: a bad option fails the start at once
    async with contextlib.AsyncExitStack() as stack:
        for adapter in built.values():
            stack.push_async_callback(adapter.aclose)
        store = await stack.enter_async_context(open_store(config.handoff.store))
        desk = HandoffDesk(config.handoff, store, built, alert=alert, cad_up=cad_up,
                           clock=clock)
        await desk.resume()
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(desk.run(), name="handoff-desk")
            try:
                yield desk
            finally:
                runner.cancel()
