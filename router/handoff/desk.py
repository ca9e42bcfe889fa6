"""Incident handoffs: accept, store durably, deliver to the destination's CAD, escalate.

A partner force that answered another force's diverted call logs the incident and hands it
back to the home force through `POST /v1/handoffs`. The desk:

- validates the incident at the edge (`Incident`) and stores it before saying yes (202), keyed
  by `(from, incident_id)` so a partner's retry is recognised (200, same handoff) and the same
  key with other content is refused (`HandoffConflict`), never silently dropped;
- delivers each destination's backlog in priority order, at least once, with the handoff id as
  idempotency key so the CAD sees it once (`delivery`); a permanent refusal makes it `failed`
  with the CAD's reason;
- holds a destination's backlog (`held`) while its CAD is down and probes it (`breaker`), then
  drains it with at most `handoff.max_concurrency` deliveries in flight, so a CAD coming back
  is not stampeded;
- escalates a handoff that misses its priority's deadline (`escalation`);
- records what the destination's people answer (`answers`): a dispatcher accepting or
  rejecting it, then its completion, from the HTTP callbacks or any adapter that hears them,
  escalating a delivered handoff nobody answers in time and sending a rejected one back or on
  (`handoff.on_reject`);
- tells the sender of every step (`notices`): the router's `notify` callback (MQTT
  `overflow/handoffs/{from}/status`, the sender's `notify_url`) and the sender's own CAD
  adapter where it takes updates.

A config reload (`reconfigure`) applies new deadlines, retries, concurrency limits, spool
folder and CAD adapters while handoffs are in flight: a replaced adapter is closed only once the
deliveries using it have finished, and a force removed from the config keeps its destination
until everything it holds is finished, so nothing accepted is lost.

Status history is recorded with every change (`store`). The store is also the queue: each
unfinished handoff is claimed by one router (`claims`), which delivers it and watches its
deadlines; a router that stops renewing its claims (killed, or cut off) has them taken by
another within seconds, and at start a router takes what nobody holds. One interrupted
mid-delivery is delivered again with the same key, which is what makes "exactly once" hold
at the CAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from adapters.base import Adapter, Answer, AnswerRefused, AnswerSink
from router.config import Handoff, RouterConfig
from router.handoff.answering import Answering
from router.handoff.answers import ANSWERED, next_partner, since_offer
from router.handoff.cads import CadLease, Cads, build_adapters, spec_of
from router.handoff.claims import Claims
from router.handoff.delivery import Courier, quiesce
from router.handoff.escalation import Alert, Escalator, Waiting
from router.handoff.incident import (
    HandoffConflict,
    Incident,
    Status,
    UnknownDestination,
    differences,
    handoff_id,
)
from router.handoff.live import Journal, Live
from router.handoff.notices import Notices, Notify, status_message
from router.handoff.store import (
    HandoffStore,
    HistoryEntry,
    Need,
    StoredHandoff,
    open_store,
)
from router.infra import metrics
from router.infra.instance import instance_name
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

CadUp = Callable[[str], bool]

AWAIT_RESUME_S = 86_400.0  # a restart resumes watching answers for handoffs delivered since
RELEASE_S = 1.0  # at a clean stop, for claims to be given up
QUIESCE_S = 2.5  # at a clean stop, for deliveries in flight to finish and be recorded


def handoff_json(h: StoredHandoff) -> dict[str, Any]:
    """The API's view of one handoff, history included."""
    out: dict[str, Any] = {
        "id": h.id, "incident_id": h.incident_id, "from": h.from_force, "to": h.to_force,
        "priority": h.priority, "status": h.status, "attempts": h.attempts,
        "accepted_at": iso(h.accepted_at), "updated_at": iso(h.updated_at),
    }
    if h.reason:
        out["reason"] = h.reason
    if h.escalated_at is not None:
        out["escalated_at"] = iso(h.escalated_at)
    if h.delivered_at is not None:
        out["delivered_at"] = iso(h.delivered_at)
    for kind, statuses in ANSWERED.items():  # the current destination's answers
        entry = next((e for e in reversed(since_offer(h.history)) if e.status in statuses),
                     None)
        if entry is not None:
            out[kind] = {"at": iso(entry.at), **entry.data}
    out["incident"] = h.incident
    out["history"] = [{"at": iso(e.at), "status": e.status,
                       **({"detail": e.detail} if e.detail else {}), **e.data}
                      for e in h.history]
    return out


class HandoffDesk:
    """Accepts, stores, delivers and escalates handoffs; `run()` runs in a task beside it."""

    def __init__(self, settings: Handoff, store: HandoffStore, adapters_by_force: Mapping[
            str, Adapter], *, alert: Alert, cad_up: CadUp, clock: Callable[[], float] = time.time,
                 built_from: RouterConfig | None = None, notify: Notify | None = None,
                 answer_for: Callable[[str], AnswerSink] | None = None):
        """`built_from`: the config the adapters were built from, so that a reload rebuilds
        only those whose spec changed (without it, the first reload rebuilds them all), and
        where a rejected handoff may go next. `notify`: hears each step a sender is told of."""
        self.store = store
        self.cad_up = cad_up
        self.clock = clock
        self.settings = settings
        self.config = built_from
        self._answer_for = answer_for  # where adapters built on a reload pass answers
        self._journal = Journal(store, clock, told=self._told)
        self._live: dict[str, Live] = {}
        self._cads = Cads()
        self._couriers: dict[str, Courier] = {}
        for force, adapter in adapters_by_force.items():
            self._add(force, CadLease(adapter, spec_of(built_from, force) if built_from else None))
        self._notices = Notices(notify, lambda force: (
            courier.cad if (courier := self._couriers.get(force)) else None))
        self._answering = Answering(store, self._notices, alert=alert, clock=clock,
                                    next_to=self._next_to, track=self._track)
        self._escalator = Escalator(settings, self._journal, self._live,
                                    self._answering.awaiting, alert=alert, clock=clock)
        self._claims = Claims(store, lambda: Need(self.clock() - AWAIT_RESUME_S, tuple(map(
            str, self.settings.ack_deadlines_s))), adopt=self._adopt, let_go=self._let_go)
        self._reconfigured = asyncio.Event()  # `run` has workers to start or adapters to close

    def _add(self, force: str, cad: CadLease) -> None:
        self._couriers[force] = Courier(force, self._cads.add(cad), self.settings,
                                        journal=self._journal, cad_up=self.cad_up,
                                        clock=self.clock, forget=self._forget)

    # -- reloading ------------------------------------------------------------------------------

    def build(self, config: RouterConfig) -> dict[str, Adapter]:
        """New or changed adapters for `config` (or AdapterConfigError); thread-safe."""
        return build_adapters(config, [f for f in config.forces if f not in self._couriers or
                                       self._couriers[f].cad.spec != spec_of(config, f)],
                              self._answer_for)

    def reconfigure(self, config: RouterConfig, built: Mapping[str, Adapter] | None = None
                    ) -> None:
        """Apply a reloaded config (with the adapters `build` made for it), or raise
        AdapterConfigError and change nothing. Nothing awaits, so no delivery sees half of
        each config; deadlines apply to unfinished handoffs too; deliveries in flight finish
        on the adapter and retry plan they started with. `handoff.store` needs a restart."""
        built = self.build(config) if built is None else built
        self.settings = config.handoff
        self.config = config
        for force, adapter in built.items():
            cad = CadLease(adapter, spec_of(config, force))
            if force in self._couriers:
                self._retire(self._couriers[force].cad)
                self._couriers[force].cad = self._cads.add(cad)
            else:
                self._add(force, cad)
        for force, courier in self._couriers.items():
            if force not in config.forces and not courier.removed:
                log.warning("%s left the config: its %d unfinished handoffs are still "
                            "delivered, new ones refused", force, courier.unfinished)
            courier.removed = force not in config.forces
            courier.configure(config.handoff)
        self._escalator.configure(config.handoff)
        self._reconfigured.set()

    def _retire(self, cad: CadLease) -> None:
        self._cads.retire(cad)
        self._reconfigured.set()

    async def aclose(self) -> None:
        """Close every adapter still held, reloads' included (once the workers have stopped)."""
        await self._cads.aclose()

    # -- the API's side -------------------------------------------------------------------------

    async def submit(self, incident: Incident) -> tuple[dict[str, Any], bool]:
        """Store the incident durably; (handoff JSON, True) if new, (existing, False) if the
        same incident was handed over before. Raises HandoffConflict if its key was handed
        over before with other content, UnknownDestination, or StoreError."""
        courier = self._couriers.get(incident.to)
        if courier is None or courier.removed:
            raise UnknownDestination(f"to: unknown force {incident.to!r}")
        now = self.clock()
        hid = handoff_id(incident.from_, incident.incident_id)
        history = [HistoryEntry(now, Status.ACCEPTED, f"from {incident.from_}")]
        status = Status.ACCEPTED
        if not courier.breaker.allows():
            status = Status.HELD
            history.append(HistoryEntry(now, status, "destination CAD unavailable"))
        record = StoredHandoff(
            id=hid, from_force=incident.from_, incident_id=incident.incident_id,
            to_force=incident.to, priority=incident.priority, status=status,
            incident=incident.contract_json(), accepted_at=now, updated_at=now, history=history)
        if await self.store.insert(record):
            for entry in history:
                metrics.HANDOFF_OUTCOMES.labels(incident.to, entry.status).inc()
            self._track(Live(hid, incident.to, incident.priority, now, record.incident, status))
            return handoff_json(record), True
        existing = await self.store.get(hid)
        if existing is None:  # cannot happen: the insert found it
            raise RuntimeError(f"handoff {hid} vanished")
        differ = differences(incident, existing.incident)
        if differ:
            raise HandoffConflict(
                f"incident {incident.incident_id} from {incident.from_} was handed over before "
                f"with a different {', '.join(differ)}; handoff {hid} stands as first "
                "accepted", differ)
        return handoff_json(existing), False

    # -- what people answer ---------------------------------------------------------------------

    async def answer(self, answer: Answer, force: str) -> dict[str, Any]:
        """Record an answer from `force` (the handoff's destination) and return the handoff.
        Raises AnswerRefused, StoreError."""
        return handoff_json(await self._answering.answer(answer, force))

    async def on_paper(self, hid: str, operator: str, reason: str) -> dict[str, Any] | None:
        """Handled on paper (Answering.on_paper); None if there is no such handoff."""
        h = await self._answering.on_paper(hid, operator, reason, drop=self._drop)
        return handoff_json(h) if h is not None else None

    def _drop(self, hid: str) -> None:
        if (item := self._live.get(hid)) is not None:
            self._couriers[item.to].drop(item)

    def _next_to(self, h: StoredHandoff) -> str | None:
        """Where a rejected handoff goes on to: None to send it back."""
        if self.settings.on_reject != "next_partner" or self.config is None:
            return None
        to = next_partner(self.config, h)
        courier = self._couriers.get(to) if to is not None else None
        return to if courier is not None and not courier.removed else None

    def _told(self, item: Live, status: Status, entry: HistoryEntry) -> None:
        """A delivery-side step is durable: tell the sender; a delivered handoff now awaits a
        dispatcher's answer."""
        self._notices.tell(status_message(item.id, item.incident, item.to, item.priority,
                                          entry))
        if status == Status.DELIVERED:
            self._await_answer(Live(item.id, item.to, item.priority, item.accepted_at,
                                    item.incident, status, item.attempts,
                                    delivered_at=entry.at))

    def _await_answer(self, item: Live) -> None:
        """Watch for a dispatcher's answer where the priority has a deadline for one."""
        if not item.escalated and item.priority in self.settings.ack_deadlines_s:
            self._answering.awaiting[item.id] = item
            self._escalator.watch(item, "acknowledgement")

    async def get(self, hid: str) -> dict[str, Any] | None:
        return handoff_json(found) if (found := await self.store.get(hid)) else None

    async def query(self, *, status: Status | None = None, to: str | None = None,
                    limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.store.query(status=status, to=to, limit=limit)
        return [handoff_json(h) for h in rows]

    def backlog(self) -> dict[str, int]:
        """Unfinished handoffs per destination (queued or in flight)."""
        return {force: courier.unfinished for force, courier in self._couriers.items()}

    async def drained(self, force: str) -> None:
        """Return once nothing is left to deliver to `force` (for tests and benchmarks)."""
        if (courier := self._couriers.get(force)) is not None:
            await courier.idle.wait()

    def cad_state_changed(self, force: str, up: bool) -> None:
        """The health watcher's word: a CAD back up ends any hold at once."""
        if (courier := self._couriers.get(force)) is not None:
            courier.breaker.cad_state_changed(up)
            courier.wake.set()

    async def quiesce(self, within_s: float) -> None:
        """Stopping: deliveries in flight finish and are recorded, no new one starts."""
        await quiesce(self._couriers.values(), within_s)

    # -- running --------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Claim every unfinished handoff no other router holds, this router's own from
        before a restart included, and those delivered within a day still awaiting a
        dispatcher; returns how many."""
        return await self._claims.start()

    async def _adopt(self, rows: list[StoredHandoff]) -> None:
        """Take on handoffs claimed from the store: deliver, watch, replay a lost sheet."""
        for h in rows:
            if h.escalated_at is not None and h.status == Status.ESCALATED:
                waiting: Waiting = "delivery" if h.delivered_at is None else "acknowledgement"
                await self._escalator.replay(Live.of(h, escalated=True), waiting,
                                             h.escalated_at)
            if h.delivered_at is not None:  # delivered: awaits an answer, nothing to deliver
                self._await_answer(Live.of(h, escalated=h.status == Status.ESCALATED))
            elif h.to_force not in self._couriers:
                log.error("handoff %s is for %r, no longer configured; left as is", h.id,
                          h.to_force)
            else:
                self._track(Live.of(h, escalated=h.escalated_at is not None))

    def _let_go(self, hid: str) -> None:
        """Another router holds `hid` now, or it needs none: stop delivering and watching it
        here (a delivery in flight ends; the CAD knows it by its key)."""
        self._drop(hid)
        self._answering.awaiting.pop(hid, None)

    async def run(self) -> None:
        """The escalator and a courier per destination; after each reload, the couriers of
        added forces and the closing of replaced adapters."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._escalator.run(), name="handoff-escalator")
            tg.create_task(self._notices.run(), name="handoff-notices")
            tg.create_task(self._claims.run(), name="handoff-claims")
            while True:
                self._reconfigured.clear()
                for courier in self._couriers.values():
                    if not courier.staffed:
                        courier.staffed = True
                        tg.create_task(self._staff(courier),
                                       name=f"handoff-worker-{courier.force}")
                    if not courier.cad.listening:  # new, or replaced by a reload
                        tg.create_task(courier.cad.listen(),
                                       name=f"handoff-listen-{courier.force}")
                for cad in self._cads.take_retired():
                    tg.create_task(self._cads.close_when_idle(cad), name="handoff-adapter-close")
                await self._reconfigured.wait()

    async def _staff(self, courier: Courier) -> None:
        """Run a courier until its force is removed and its last handoff finished; then its
        destination and adapter go."""
        # a reload may have brought the force back while the courier was stopping
        while not (courier.removed and not courier.unfinished):
            await courier.run()
        del self._couriers[courier.force]
        self._retire(courier.cad)
        log.info("%s: the last handoff held for it is finished; destination removed",
                 courier.force)

    def _track(self, item: Live) -> None:
        self._claims.hold(item.id)
        self._live[item.id] = item
        self._couriers[item.to].take(item)
        self._escalator.watch(item)

    def _forget(self, item: Live) -> bool:
        return self._live.pop(item.id, None) is not None


@contextlib.asynccontextmanager
async def open_desk(config: RouterConfig, *, alert: Alert, cad_up: CadUp,
                    clock: Callable[[], float] = time.time, notify: Notify | None = None,
                    owner: str | None = None) -> AsyncIterator[HandoffDesk]:
    """Open the store and adapters, claim unfinished handoffs as `owner` (this router's name
    among those sharing the store), run the workers; on exit (normal, error or cancellation)
    stop the workers, give up the claims, then commit and close everything."""
    opened: list[HandoffDesk] = []  # adapters are built before the desk they answer to

    def answer_for(force: str) -> AnswerSink:
        async def sink(answer: Answer) -> None:
            if not opened:
                raise AnswerRefused("unavailable", "the handoff desk is starting")
            await opened[0].answer(answer, force)
        return sink

    # before any I/O: a bad option fails the start at once
    built = build_adapters(config, answer_for=answer_for)
    async with contextlib.AsyncExitStack() as stack:
        async with contextlib.AsyncExitStack() as until_owned:
            for adapter in built.values():
                until_owned.push_async_callback(adapter.aclose)
            store = await stack.enter_async_context(open_store(config.handoff.store))
            store.owner = owner or instance_name()
            desk = HandoffDesk(config.handoff, store, built, alert=alert, cad_up=cad_up,
                               clock=clock, built_from=config, notify=notify,
                               answer_for=answer_for)
            opened.append(desk)
            stack.push_async_callback(desk.aclose)  # the desk owns the adapters from here
            until_owned.pop_all()
        await desk.resume()
        try:
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(desk.run(), name="handoff-desk")
                try:
                    yield desk
                finally:
                    await desk.quiesce(QUIESCE_S)
                    runner.cancel()
        finally:  # others take them at once, not a lease later
            try:  # wait_for, not timeout: this may run in a task being cancelled
                await asyncio.wait_for(store.release(), RELEASE_S)
            except Exception as exc:
                log.warning("handoff claims not released (%s): they expire in %.0f s", exc,
                            store.lease_s)
