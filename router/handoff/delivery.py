"""Delivery to one destination's CAD: its backlog in priority order, at most
`handoff.max_concurrency` deliveries in flight, each retried with exponential backoff and jitter
(tenacity) and bounded by a timeout, behind the destination's circuit breaker.

Two kinds of failure are told apart. A CAD that cannot be reached trips the breaker: the
whole backlog is held. A CAD that answers but cannot take one handoff (`Deferred`: a 5xx for
it) puts that handoff aside with its own growing backoff, and the rest of the backlog goes on:
one bad handoff never holds its destination."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from adapters.base import Ack, Adapter, AdapterUnavailable, Deferred, Delivery, Refusal
from router.config import Handoff
from router.handoff.breaker import CadBreaker
from router.handoff.cads import CadLease
from router.handoff.incident import Status
from router.handoff.live import MAX_IDLE_S, Journal, Live
from router.handoff.store import storable
from router.infra import metrics

log = logging.getLogger(__name__)

DEFER_MAX_S = 300.0  # a deferred handoff is tried again at least this often


@dataclass(slots=True)
class Slots:
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


class Courier:
    """Delivers one destination's handoffs; `run` until its force is removed and drained.

    `forget(item)` tells the desk a handoff is finished; it returns False if the desk had
    already let it go.
    """

    def __init__(self, force: str, cad: CadLease, settings: Handoff, *, journal: Journal,
                 cad_up: Callable[[str], bool], clock: Callable[[], float],
                 forget: Callable[[Live], bool]) -> None:
        self.force = force
        self.cad = cad
        self.journal = journal
        self.clock = clock
        self._forget = forget
        self.breaker = CadBreaker(settings.retry.hold_probe_s, clock=clock,
                                  cad_up=lambda: cad_up(force))
        self.slots = Slots(settings.max_concurrency)
        self.retry = settings.retry
        self.queue: list[tuple[tuple[int, float, str], Live]] = []
        self.deferred: list[tuple[float, str, Live]] = []  # (not before, id, handoff)
        self.wake = asyncio.Event()
        self.unfinished = 0
        self.idle = asyncio.Event()  # set while unfinished == 0
        self.idle.set()
        self.removed = False  # its force left the config: finish what it holds, take nothing new
        self.staffed = False  # its `run` has been started
        self.closing = False  # the desk is stopping: start no delivery
        self.in_flight = 0  # deliveries started and not yet recorded
        self.quiet = asyncio.Event()  # set while in_flight == 0
        self.quiet.set()

    def configure(self, settings: Handoff) -> None:
        """New retry plan and limit; deliveries in flight finish on the plan they started."""
        self.retry = settings.retry
        self.breaker.hold_s = settings.retry.hold_probe_s
        self.slots.resize(settings.max_concurrency)
        self.wake.set()

    # -- the backlog ----------------------------------------------------------------------------

    def take(self, item: Live) -> None:
        """A new unfinished handoff for this destination."""
        self.unfinished += 1
        self.idle.clear()
        metrics.HANDOFF_BACKLOG.labels(item.to, item.priority).inc()
        self.push(item)

    def push(self, item: Live) -> None:
        if item.finished:  # dropped (on paper) while a delivery of it was in flight
            return
        heapq.heappush(self.queue, (item.order, item))
        self.wake.set()

    def pop(self) -> Live:
        return heapq.heappop(self.queue)[1]

    def drop(self, item: Live) -> None:
        """Stop trying to deliver `item` (handled on paper): out of the backlog, finished.
        A delivery already in flight ends on its own; the store refuses its final record."""
        item.done = True
        self.queue = [entry for entry in self.queue if entry[1] is not item]
        heapq.heapify(self.queue)
        self.finish(item)

    def finish(self, item: Live) -> None:
        if self._forget(item):
            item.finished = True
            self.unfinished -= 1
            if not self.unfinished:
                self.idle.set()
                self.wake.set()  # a removed force's worker may now stop
            metrics.HANDOFF_BACKLOG.labels(item.to, item.priority).dec()

    async def changed(self, within_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within_s, 0.0)):
                await self.wake.wait()
        self.wake.clear()

    # -- the worker -----------------------------------------------------------------------------

    def _due(self) -> float:
        """Put deferred handoffs whose time has come back in the queue; seconds until the
        next one's (at most MAX_IDLE_S)."""
        now = self.clock()
        while self.deferred and self.deferred[0][0] <= now:
            self.push(heapq.heappop(self.deferred)[2])
        return min(self.deferred[0][0] - now, MAX_IDLE_S) if self.deferred else MAX_IDLE_S

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                if self.closing:
                    await asyncio.Future()  # until cancelled: see `quiesce`
                next_due = self._due()
                if not self.queue:
                    if self.removed and not self.unfinished:
                        return
                    await self.changed(next_due)
                    continue
                if not self.breaker.allows():
                    await self._hold_queued()
                    if self.breaker.probe():  # half-open: one handoff, one attempt
                        await self.slots.acquire()
                        await self._deliver(self.pop(), attempts=1)
                        continue
                    await self.changed(self.breaker.wait_s(MAX_IDLE_S))
                    continue
                await self.slots.acquire()
                if not self.queue or not self.breaker.allows():
                    self.slots.release()
                    continue
                tg.create_task(self._deliver(self.pop()))

    async def _hold_queued(self) -> None:
        """Say so in each waiting handoff's status: the CAD is unavailable."""
        waiting = [item for _, item in self.queue
                   if not item.escalated and item.status in (Status.ACCEPTED, Status.DELIVERING)]
        if waiting:
            await asyncio.gather(*(self.journal.record(item, Status.HELD,
                                                       "destination CAD unavailable")
                                   for item in waiting))

    async def _deliver(self, item: Live, attempts: int | None = None) -> None:
        """One handoff to its CAD, retried. The slot is freed as soon as the CAD has answered:
        the bound protects the CAD, and our own commit need not hold it."""
        released = False
        self.in_flight += 1
        self.quiet.clear()

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.release()

        try:
            started = None
            if not item.escalated and item.status != Status.DELIVERING:
                # not awaited before sending: if we crash first, nothing differs (the handoff
                # is delivered again on restart either way), and it keeps a commit off the path
                started = self.journal.record_soon(item, Status.DELIVERING,
                                                   f"to {self.force}'s CAD")
            try:
                with self.cad.lease() as adapter:  # the whole delivery on one adapter
                    outcome = await self._attempts(adapter, item,
                                                   attempts or self.retry.attempts)
            except Deferred as exc:  # the CAD is up, but not for this one: it alone waits
                release()
                item.reason = storable(str(exc))
                if started is not None:
                    await started
                await self._defer(item, str(exc))
                return
            except AdapterUnavailable as exc:
                release()
                item.reason = storable(str(exc))  # a CAD's words, also printed on a sheet
                if self.breaker.trip():
                    log.warning("%s's CAD unavailable (%s): holding its backlog", self.force,
                                exc)
                if started is not None:
                    await started
                if not item.escalated:
                    await self.journal.record(item, Status.HELD, f"CAD unavailable: {exc}",
                                              reason=item.reason)
                self.push(item)
                return
            finally:
                release()
            if started is not None:
                await started
            item.done = True
            if isinstance(outcome, Refusal):
                await self.journal.record(item, Status.FAILED, f"refused: {outcome.reason}",
                                          reason=outcome.reason)
                self.finish(item)
            else:
                await self._delivered(item, outcome)
            if self.breaker.close():
                log.info("%s's CAD answers again: draining its backlog", self.force)
                self.wake.set()
        except Exception as exc:  # the store failed: keep the handoff, try again later
            log.error("handoff %s: %s; will retry", item.id, exc)
            item.done = False
            if not item.finished:
                self.breaker.trip()
                self.push(item)
        finally:
            release()
            self.in_flight -= 1
            if not self.in_flight:
                self.quiet.set()

    async def _defer(self, item: Live, why: str) -> None:
        item.deferrals += 1
        wait = min(self.retry.max_s * 2 ** (item.deferrals - 1), DEFER_MAX_S)
        item.not_before = self.clock() + wait
        metrics.HANDOFF_DEFERRALS.labels(self.force).inc()
        log.warning("handoff %s: %s's CAD cannot take it now (%s); again in %.0f s, the rest "
                    "of its backlog goes on", item.id, self.force, why, wait)
        if not item.escalated:  # an escalated handoff says so until it is delivered
            await self.journal.record(item, Status.HELD, f"the CAD cannot take it now ({why}); "
                                      f"next attempt in {wait:.0f}s", reason=item.reason)
        heapq.heappush(self.deferred, (item.not_before, item.id, item))
        self.wake.set()

    async def _attempts(self, adapter: Adapter, item: Live, attempts: int) -> Ack | Refusal:
        retry = self.retry
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
                    log.exception("adapter for %s raised", self.force)
                    raise AdapterUnavailable(f"adapter error: {exc!r}") from exc
        raise AssertionError("tenacity stops by raising")  # pragma: no cover

    async def _delivered(self, item: Live, ack: Ack) -> None:
        now = self.clock()
        detail = "acknowledged by the CAD" + (f" as {ack.reference}" if ack.reference else "")
        if ack.duplicate:
            detail += " (it already had it)"
        await self.journal.record(item, Status.DELIVERED, detail, delivered_at=now)
        metrics.HANDOFF_DELIVERY_SECONDS.labels(self.force).observe(max(now - item.accepted_at,
                                                                         0.0))
        self.finish(item)


async def quiesce(couriers: Iterable[Courier], within_s: float) -> None:
    """Start no more deliveries, and give those in flight `within_s` to finish and be recorded:
    a router stopping cleanly then hands over (releases) no handoff a CAD has already taken,
    so another router does not send it again. Not `asyncio.timeout`: the caller may itself be
    being cancelled (a stop), and this must still end on time."""
    couriers = list(couriers)
    for courier in couriers:
        courier.closing = True
        courier.wake.set()
    waits = [asyncio.ensure_future(c.quiet.wait()) for c in couriers if not c.quiet.is_set()]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=within_s)
        for wait in pending:
            wait.cancel()
