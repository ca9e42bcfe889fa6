"""The per-destination circuit breaker ("hold and probe"), alone and as a courier drives it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from adapters.base import Ack, AdapterUnavailable, Delivery, Outcome
from router.config import Handoff
from router.handoff.breaker import CadBreaker
from router.handoff.cads import CadLease
from router.handoff.delivery import Courier
from router.handoff.incident import Status
from router.handoff.live import Journal, Live
from router.handoff.store import HandoffStore, StatusChange

HOLD_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_closed_until_tripped(clock: Clock) -> None:
    breaker = CadBreaker(HOLD_S, clock=clock)
    assert breaker.state == "closed" and breaker.allows()
    assert not breaker.probe()  # nothing to probe while closed
    assert breaker.trip() is True  # first trip: the caller logs it
    assert breaker.state == "open" and not breaker.allows()
    assert breaker.trip() is False  # already open


def test_half_open_allows_exactly_one_attempt_after_the_hold(clock: Clock) -> None:
    breaker = CadBreaker(HOLD_S, clock=clock)
    breaker.trip()
    clock.now += HOLD_S - 0.001
    assert not breaker.probe()
    assert breaker.wait_s(60.0) == pytest.approx(0.001)
    clock.now += 0.001
    assert breaker.probe()
    assert breaker.state == "half-open" and not breaker.allows()
    assert not breaker.probe()  # one probe at a time
    clock.now += HOLD_S - 0.001
    assert not breaker.probe()


def test_probe_success_closes_failure_reopens(clock: Clock) -> None:
    breaker = CadBreaker(HOLD_S, clock=clock)
    breaker.trip()
    clock.now += HOLD_S
    assert breaker.probe()
    assert breaker.trip() is False  # the probe failed: open for another hold
    assert breaker.state == "open"
    clock.now += HOLD_S - 0.001
    assert not breaker.probe()
    clock.now += 0.001
    assert breaker.probe()
    assert breaker.close() is True  # the caller logs "answers again"
    assert breaker.state == "closed" and breaker.allows()
    assert breaker.close() is False


def test_a_probe_that_never_reports_counts_as_failed(clock: Clock) -> None:
    breaker = CadBreaker(HOLD_S, clock=clock)
    breaker.trip()
    clock.now += HOLD_S
    assert breaker.probe()
    clock.now += HOLD_S
    assert breaker.state == "open" and breaker.probe()


def test_cad_up_news_closes_at_once_and_down_holds(clock: Clock) -> None:
    up = True
    breaker = CadBreaker(HOLD_S, clock=clock, cad_up=lambda: up)
    breaker.trip()
    breaker.cad_state_changed(False)
    assert breaker.state == "open"
    breaker.cad_state_changed(True)
    assert breaker.state == "closed" and breaker.allows()
    up = False  # the watcher says down: no delivery, and no probe either
    assert not breaker.allows()
    breaker.trip()
    clock.now += HOLD_S
    assert not breaker.probe()
    up = True
    assert breaker.probe()


def test_a_reload_changes_the_next_hold(clock: Clock) -> None:
    breaker = CadBreaker(HOLD_S, clock=clock)
    breaker.hold_s = 1.0
    breaker.trip()
    assert breaker.wait_s(60.0) == pytest.approx(1.0)


# ---- driven by a courier --------------------------------------------------------------------


class _Store:
    """Records status changes, every commit instant."""

    def __init__(self) -> None:
        self.changes: list[StatusChange] = []
        self._new = asyncio.Event()

    def record_soon(self, change: StatusChange) -> asyncio.Future[None]:
        self.changes.append(change)
        self._new.set()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def count(self, hid: str, status: Status) -> int:
        return sum(c.id == hid and c.status == status for c in self.changes)

    async def seen(self, hid: str, status: Status, times: int = 1) -> None:
        async with asyncio.timeout(5):
            while self.count(hid, status) < times:
                self._new.clear()
                await self._new.wait()


class _Cad:
    """Unavailable while `down`; every call counted, and awaitable by count."""

    def __init__(self) -> None:
        self.down = True
        self.calls: list[str] = []
        self._called = asyncio.Condition()

    async def deliver(self, delivery: Delivery) -> Outcome:
        async with self._called:
            self.calls.append(delivery.key)
            self._called.notify_all()
        if self.down:
            raise AdapterUnavailable("connection refused")
        return Ack(reference="ok")

    async def aclose(self) -> None:
        return None

    async def called(self, n: int) -> None:
        async with asyncio.timeout(5), self._called:
            await self._called.wait_for(lambda: len(self.calls) >= n)


def _courier(cad: _Cad, clock: Clock, store: _Store, finished: list[str]) -> Courier:
    settings = Handoff.model_validate({"max_concurrency": 1, "retry": {
        "attempts": 3, "initial_s": 0.001, "max_s": 0.001, "attempt_timeout_s": 1.0,
        "hold_probe_s": HOLD_S}})

    def forget(item: Live) -> bool:
        finished.append(item.id)
        return True

    return Courier("met", CadLease(cast(Any, cad), None), settings,
                   journal=Journal(cast(HandoffStore, store), clock), cad_up=lambda _: True,
                   clock=clock, forget=forget)


def _live(n: int, clock: Clock) -> Live:
    return Live(f"h{n}", "met", "P1", clock() + n, {"incident_id": f"I-{n}"}, Status.ACCEPTED)


async def test_courier_opens_after_retries_then_probes_once_and_drains(clock: Clock) -> None:
    cad, store, finished = _Cad(), _Store(), []
    courier = _courier(cad, clock, store, finished)
    for n in (1, 2):
        courier.take(_live(n, clock))
    async with asyncio.TaskGroup() as tg:
        worker = tg.create_task(courier.run())
        await cad.called(3)  # every retry of the first handoff, then the breaker opens
        await store.seen("h2", Status.HELD)  # the worker holds the rest of the backlog
        assert courier.breaker.state == "open" and cad.calls == ["h1"] * 3

        clock.now += HOLD_S  # half-open: ONE attempt of ONE handoff, despite 3 retries
        courier.wake.set()
        await cad.called(4)
        await store.seen("h1", Status.HELD, times=2)  # the probe failed
        assert courier.breaker.state == "open" and cad.calls == ["h1"] * 4 and not finished

        cad.down = False
        clock.now += HOLD_S  # the next probe gets through: closed, the backlog drains
        courier.wake.set()
        async with asyncio.timeout(5):
            await courier.idle.wait()
        assert courier.breaker.state == "closed"
        assert finished == ["h1", "h2"] and cad.calls == ["h1"] * 5 + ["h2"]
        worker.cancel()

