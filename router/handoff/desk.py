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

A config reload (`reconfigure`) applies new deadlines, retries, concurrency limits, spool
folder and CAD adapters while handoffs are in flight: a replaced adapter is closed only once the
deliveries using it have finished, and a force removed from the config keeps its destination
until everything it holds is finished, so nothing accepted is lost.

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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
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
from router.config import FORCE_ID, Cad, Handoff, RouterConfig
from router.engine.model import Service
from router.handoff.sheets import Sheet, write_sheet
from router.handoff.store import HandoffStore, HistoryEntry, StatusChange, StoredHandoff, open_store
from router.infra import metrics

log = logging.getLogger(__name__)

Priority = Literal["P1", "P2", "P3", "P4"]
RANK: Mapping[str, int] = {"P1": 0, "P2": 1, "P3": 2, "P4": 3}
ID_NAMESPACE = uuid.UUID("0d3c6f0e-6a43-5b8e-9a51-2f1f0c6f7e21")
MAX_IDLE_S = 1.0  # a closed destination re-checks its CAD at least this often
Alert = Callable[[dict[str, Any]], None]
CadUp = Callable[[str], bool]
Spec = tuple[Cad, str]  # what a force's adapter is built from: its `cad:` block, the spool folder

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


def _spec(config: RouterConfig, force: str) -> Spec:
    return config.forces[force].cad, config.handoff.spool_dir


@dataclass(slots=True, eq=False)
class _Cad:
    """An adapter and the deliveries using it: one a reload replaced is closed once they end."""

    adapter: Adapter
    spec: Spec | None  # None: built by someone who did not say from what
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while users == 0

    def __post_init__(self) -> None:
        self.idle.set()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Adapter]:
        self.users += 1
        self.idle.clear()
        try:
            yield self.adapter
        finally:
            self.users -= 1
            if not self.users:
                self.idle.set()


@dataclass(slots=True)
class _Slots:
    """Deliveries in flight to one CAD, at most `limit`. A reload may change the limit: those
    already in flight finish, and no new one starts while `limit` or more are."""

    limit: int
    busy: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    async def acquire(self) -> None:
        while self.busy >= self.limit:
            self.freed.clear()
            await self.freed.wait()
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        self.freed.set()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self.freed.set()


@dataclass(slots=True)
class _Destination:
    force: str
    cad: _Cad
    slots: _Slots
    queue: list[tuple[tuple[int, float, str], _Live]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    suspended_until: float | None = None  # set after retries run out: hold and probe
    unfinished: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while unfinished == 0
    removed: bool = False  # its force left the config: finish what it holds, take nothing new
    staffed: bool = False  # its worker has been started

    def __post_init__(self) -> None:
        self.idle.set()

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
    does); `submit`, `get`, `query`, `cad_state_changed` and `reconfigure` may be called
    meanwhile."""

    def __init__(self, settings: Handoff, store: HandoffStore, adapters_by_force: Mapping[
            str, Adapter], *, alert: Alert, cad_up: CadUp, clock: Callable[[], float] = time.time,
                 built_from: RouterConfig | None = None):
        """`built_from`: the config the adapters were built from, so that a reload rebuilds
        only those whose spec changed (without it, the first reload rebuilds them all)."""
        self.store = store
        self.alert = alert
        self.cad_up = cad_up
        self.clock = clock
        self._apply(settings)
        self._dests: dict[str, _Destination] = {}
        for force, adapter in adapters_by_force.items():
            self._add(force, _Cad(adapter, _spec(built_from, force) if built_from else None))
        self._live: dict[str, _Live] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._deadline_wake = asyncio.Event()
        self._replaced: list[_Cad] = []  # to close once idle; `run` starts the closing
        self._unclosed = {dest.cad for dest in self._dests.values()}
        self._reconfigured = asyncio.Event()  # `run` has workers to start or adapters to close

    def _apply(self, settings: Handoff) -> None:
        self.settings = settings
        self.spool_dir = Path(settings.spool_dir)
        self._deadline_s: dict[str, float] = {str(k): v for k, v in settings.deadlines_s.items()}

    def _add(self, force: str, cad: _Cad) -> None:
        self._dests[force] = _Destination(force, cad, _Slots(self.settings.max_concurrency))

    # -- reloading ------------------------------------------------------------------------------

    def reconfigure(self, config: RouterConfig) -> None:
        """Apply a reloaded config, or raise AdapterConfigError and change nothing.

        Every adapter to replace is built before anything is swapped, and nothing awaits
        from then on, so no delivery sees half of each config. Deadlines apply to unfinished
        handoffs too; deliveries in flight finish on the adapter and retry plan they started
        with. `handoff.store` is not reapplied: the store stays open until a restart.
        """
        changed = [force for force in config.forces if force not in self._dests
                   or self._dests[force].cad.spec != _spec(config, force)]
        built = build_adapters(config, changed)
        self._apply(config.handoff)
        for force, adapter in built.items():
            cad = _Cad(adapter, _spec(config, force))
            self._unclosed.add(cad)
            if force in self._dests:
                self._replace(self._dests[force].cad)
                self._dests[force].cad = cad
            else:
                self._add(force, cad)
        for force, dest in self._dests.items():
            if force not in config.forces and not dest.removed:
                log.warning("%s left the config: its %d unfinished handoffs are still "
                            "delivered, new ones refused", force, dest.unfinished)
            dest.removed = force not in config.forces
            dest.slots.resize(config.handoff.max_concurrency)
            dest.wake.set()
        self._deadlines = [(item.accepted_at + self._deadline_s[item.priority], item.id)
                           for item in self._live.values()
                           if not item.escalated and item.priority in self._deadline_s]
        heapq.heapify(self._deadlines)
        self._deadline_wake.set()
        self._reconfigured.set()

    def _replace(self, cad: _Cad) -> None:
        self._replaced.append(cad)
        self._reconfigured.set()

    async def _close_when_idle(self, cad: _Cad) -> None:
        await cad.idle.wait()
        await self._close(cad)

    async def _close(self, cad: _Cad) -> None:
        if cad in self._unclosed:
            self._unclosed.discard(cad)
            try:
                await cad.adapter.aclose()
            except Exception:
                log.exception("closing a CAD adapter failed")

    async def aclose(self) -> None:
        """Close every adapter still held, reloads' included (once the workers have stopped)."""
        for cad in list(self._unclosed):
            await self._close(cad)

    # -- the API's side -------------------------------------------------------------------------

    async def submit(self, incident: Incident) -> tuple[dict[str, Any], bool]:
        """Store the incident durably; (handoff JSON, True) if new, (existing, False) if not."""
        dest = self._dests.get(incident.to)
        if dest is None or dest.removed:
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
        dest = self._dests.get(force)
        if dest is not None:
            await dest.idle.wait()

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
        """The escalator and a worker per destination; after each reload, the workers of added
        forces and the closing of replaced adapters."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._escalator(), name="handoff-escalator")
            while True:
                self._reconfigured.clear()
                for dest in self._dests.values():
                    if not dest.staffed:
                        dest.staffed = True
                        tg.create_task(self._worker(dest), name=f"handoff-worker-{dest.force}")
                for cad in self._replaced:
                    tg.create_task(self._close_when_idle(cad), name="handoff-adapter-close")
                self._replaced.clear()
                await self._reconfigured.wait()

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
                dest.wake.set()  # a removed force's worker may now stop
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
        async with asyncio.TaskGroup() as tg:
            while True:
                if not dest.queue:
                    if dest.removed and not dest.unfinished:
                        self._drop(dest)
                        return
                    await dest.changed(MAX_IDLE_S)
                    continue
                if not self._open(dest):
                    await self._hold_queued(dest)
                    due = dest.suspended_until
                    if due is not None and self.clock() >= due and self.cad_up(dest.force):
                        # half-open: one handoff, one attempt; success reopens the gate
                        dest.suspended_until = self.clock() + self.settings.retry.hold_probe_s
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

    def _drop(self, dest: _Destination) -> None:
        """A removed force's last handoff is finished: its destination and adapter go."""
        del self._dests[dest.force]
        self._replace(dest.cad)
        log.info("%s: the last handoff held for it is finished; destination removed",
                 dest.force)

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
        with dest.cad.lease() as adapter:  # the whole delivery on one adapter
            return await self._attempts(dest.force, adapter, item, attempts)

    async def _attempts(self, force: str, adapter: Adapter, item: _Live,
                        attempts: int) -> Ack | Refusal:
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
                        return await adapter.deliver(delivery)
                except TimeoutError as exc:
                    raise AdapterUnavailable(
                        f"no answer within {retry.attempt_timeout_s:g}s") from exc
                except AdapterUnavailable:
                    raise
                except Exception as exc:  # an adapter bug must not take the desk down
                    log.exception("adapter for %s raised", force)
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
        now = self.clock()
        deadline = self._deadline_s.get(item.priority)  # a reload may have changed it since
        if (item.done or item.id not in self._live or deadline is None
                or now < item.accepted_at + deadline):
            return
        item.escalated = True
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


def build_adapters(config: RouterConfig, forces: Iterable[str] | None = None
                   ) -> dict[str, Adapter]:
    """One adapter per force (or per force named), its options validated now (raises
    AdapterConfigError naming every force at fault, one `forces.X.cad: ...` a line)."""
    spool = Path(config.handoff.spool_dir)
    built = {}
    problems = []
    for force in config.forces if forces is None else forces:
        spec = config.forces[force]
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
        async with contextlib.AsyncExitStack() as until_owned:
            for adapter in built.values():
                until_owned.push_async_callback(adapter.aclose)
            store = await stack.enter_async_context(open_store(config.handoff.store))
            desk = HandoffDesk(config.handoff, store, built, alert=alert, cad_up=cad_up,
                               clock=clock, built_from=config)
            stack.push_async_callback(desk.aclose)  # the desk owns the adapters from here
            until_owned.pop_all()
        await desk.resume()
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(desk.run(), name="handoff-desk")
            try:
                yield desk
            finally:
                runner.cancel()
