"""Mutual-aid caps across routers on a real broker: several call desks in one process, each
with its own MQTT link and router.watch.peers, routing to one partner with a small cap.

The bound under test (README, "Several routers"): when router i admits a call, the partner's
true aid is at most its cap plus the calls the other routers admitted to it within the last
W = DEBOUNCE_S + TICK_S + broker and loop latency; calls spaced beyond W never exceed the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from configs.builder import config, force
from conftest import Broker
from service_support import Running, environ, make_config, running_service

from router.config import Mqtt, RouterConfig
from router.engine.calls import CallDesk
from router.engine.model import CentreState, CentreView, Service, Snapshot
from router.infra.mqtt_link import MqttLink
from router.watch.peers import DEBOUNCE_S, TICK_S, Peers

pytestmark = pytest.mark.services

S101 = Service.NON_EMERGENCY
LATENCY_S = 0.1  # allowance for broker round trip and this one loop serving every router
W = DEBOUNCE_S + TICK_S + LATENCY_S
SNAPSHOT = Snapshot({"aa": CentreView(CentreState.DOWN), "bb": CentreView(CentreState.NORMAL)})


def region(cap: int) -> RouterConfig:
    """`aa` is down and sends its 101s to `bb`, which takes `cap` at once (the queue never
    binds: many handlers); past the cap a 101 is shed, never sent as last resort."""
    return config(force("aa", routes_999=[("bb", 1)], routes_101=[("bb", 1)]),
                  force("bb", handlers=1000, max_queue=1000, aid_max=cap,
                        aid_queue_below=1000))


@dataclass
class Router:
    name: str
    desk: CallDesk
    link: MqttLink
    peers: Peers
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    calls: int = 0

    def route(self) -> bool:
        """One 101 from `aa`; True if `bb` took it as mutual aid."""
        self.calls += 1
        record, _ = self.desk.route(f"{self.name}-{self.calls}", S101, "aa", SNAPSHOT)
        return record["destination"] == "bb"

    async def stop(self, *, clean: bool) -> None:
        """Clean: the final word is published; else as a crash (or SIGKILL): silence."""
        self.tasks[1].cancel()
        await asyncio.wait([self.tasks[1]])
        if clean:
            await self.peers.close()
        self.tasks[0].cancel()
        await asyncio.wait([self.tasks[0]])


async def wait_for(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def routers(broker: Broker, cfg: RouterConfig, *names: str) -> AsyncIterator[list[Router]]:
    started: list[Router] = []
    try:
        for name in names:
            started.append(await start(broker, cfg, name))
        yield started
    finally:
        for r in started:
            if not r.tasks[0].done():
                await r.stop(clean=False)


async def start(broker: Broker, cfg: RouterConfig, name: str) -> Router:
    link = MqttLink(Mqtt(port=broker.port))
    desk = CallDesk(cfg)
    r = Router(name, desk, link, Peers(desk, link, name))
    r.tasks = [asyncio.create_task(link.run()), asyncio.create_task(r.peers.run())]
    await wait_for(lambda: link.connected)
    await asyncio.sleep(0.1)  # retained messages of others (and of a previous life) arrive
    return r


def aid(rs: list[Router]) -> int:
    """The partner's true aid: every router's own calls to it."""
    return sum(r.desk.ledger.aid.get("bb", 0) for r in rs)


async def retained(broker: Broker) -> dict[str, Any]:
    """Retained load messages a fresh subscriber gets."""
    seen: dict[str, Any] = {}
    async with aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
        await client.subscribe("overflow/instances/+/load")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for message in client.messages:
                    seen[str(message.topic)] = json.loads(bytes(message.payload))
    return seen


async def test_calls_spaced_beyond_the_interval_never_pass_the_cap(broker: Broker) -> None:
    async with routers(broker, region(cap=4), "r1", "r2", "r3") as rs:
        admitted = []
        for n in range(9):
            admitted.append(rs[n % 3].route())
            await asyncio.sleep(W + 0.05)
        assert admitted == [True] * 4 + [False] * 5
        assert aid(rs) == 4
        assert all(r.desk.ledger.total_aid.get("bb", 0) == 4 for r in rs)
        assert all(r.desk.load("bb")["aid"] == 4 for r in rs)  # the API and board say the same


async def test_concurrent_calls_pass_the_cap_by_at_most_the_others_admissions_within_w(
        broker: Broker) -> None:
    cap = 6
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    async with routers(broker, region(cap), "r1", "r2", "r3") as rs:
        admissions: list[tuple[float, int]] = []  # (time, router)
        worst, total_checks = 0, 0
        deadline = time.monotonic() + 4.0
        n = 0
        while time.monotonic() < deadline:
            i = rng.randrange(3)  # a load balancer spreading calls over the routers
            r = rs[i]
            if r.route():
                now = time.monotonic()
                admissions.append((now, i))
                others = sum(1 for t, j in admissions if j != i and t > now - W)
                total = aid(rs)
                assert total <= cap + others, (total, cap, others)
                worst = max(worst, total - cap)
                total_checks += 1
                call_id = f"{r.name}-{r.calls}"
                loop.call_later(rng.uniform(0.1, 0.5), r.desk.end, call_id)
            n += 1
            await asyncio.sleep(0.02)  # about 40 calls a second: 200 times the Met's 999 peak
        assert total_checks > 50  # the cap was reached and freed again many times
        print(f"\n{n} calls, {total_checks} admitted, worst excess over cap {cap}: {worst}")
    # without sharing each router alone would have let `bb` reach 3 x cap


async def test_a_restarted_router_counts_its_calls_from_before_the_restart(
        broker: Broker) -> None:
    cfg = region(cap=4)
    async with routers(broker, cfg, "router-a", "router-b") as (a, b):
        assert [a.route() for _ in range(3)] == [True] * 3
        await wait_for(lambda: b.desk.ledger.total_aid.get("bb", 0) == 3)
        await a.stop(clean=False)  # SIGKILL: its calls go on at bb
        again = await start(broker, cfg, "router-a")  # same OVERFLOW_INSTANCE
        try:
            await wait_for(lambda: again.desk.ledger.total_aid.get("bb", 0) == 3)
            assert again.peers.book.recalled is not None and not again.peers.book.twin
            assert [again.route() for _ in range(2)] == [True, False]  # one left under the cap
            # and it publishes them with its own, so the others count them too
            await asyncio.sleep(W)
            assert b.desk.ledger.total_aid.get("bb", 0) == 4
            assert b.peers.book.live(time.monotonic()) == (1, 0)
        finally:
            await again.stop(clean=False)


async def test_a_silent_router_is_held_then_counted_down_and_its_message_cleared(
        broker: Broker) -> None:
    cfg = region(cap=4)
    async with routers(broker, cfg, "gone", "watcher") as (gone, watcher):
        watcher.peers.book.hold_s = 0.3
        watcher.desk.max_call_duration_s = 2.0  # its calls are counted down over 2 s
        assert [gone.route() for _ in range(2)] == [True, True]
        await wait_for(lambda: watcher.desk.ledger.total_aid.get("bb", 0) == 2)
        await gone.stop(clean=False)
        silent_at = time.monotonic()
        await asyncio.sleep(0.2)
        assert watcher.desk.ledger.total_aid.get("bb", 0) == 2  # held: it may only be cut off
        await wait_for(lambda: watcher.desk.ledger.total_aid.get("bb", 0) == 1, within=3)
        await wait_for(lambda: watcher.desk.ledger.total_aid.get("bb", 0) == 0, within=3)
        assert time.monotonic() - silent_at >= 0.3 + 1.0  # not before half the count-down
        await wait_for(lambda: not watcher.peers.book.peers, within=3)
        await asyncio.sleep(0.2)
        assert "overflow/instances/gone/load" not in await retained(broker)  # cleared


async def test_a_clean_stop_is_counted_down_at_once_or_forgotten_without_calls(
        broker: Broker) -> None:
    async with routers(broker, region(cap=4), "busy", "idle", "watcher") as (busy, idle, w):
        assert busy.route()
        await wait_for(lambda: w.desk.ledger.total_aid.get("bb", 0) == 1)
        await busy.stop(clean=True)
        await idle.stop(clean=True)
        await wait_for(lambda: w.peers.book.live(time.monotonic()) == (0, 1))
        assert w.desk.ledger.total_aid.get("bb", 0) == 1  # its call is still at bb: counted down
        left = await retained(broker)
        assert left["overflow/instances/busy/load"]["final"] is True
        assert "overflow/instances/idle/load" not in left


async def test_an_end_told_to_another_router_frees_the_call_where_it_was_routed(
        broker: Broker) -> None:
    async with routers(broker, region(cap=4), "a", "b") as (a, b):
        assert a.route()
        await wait_for(lambda: b.desk.ledger.total_aid.get("bb", 0) == 1)
        assert b.desk.finish("a-1") is None  # Kamailio told the first router that answered
        await wait_for(lambda: a.desk.ledger.aid.get("bb", 0) == 0)
        await wait_for(lambda: b.desk.ledger.total_aid.get("bb", 0) == 0)


async def _aid(api: Running) -> int:
    status, body = await api.call("GET", "/v1/forces", "viewer")
    assert status == 200
    return sum(f["aid_in_flight"] for f in body["forces"].values())


async def test_two_router_services_count_each_others_calls_over_http(
        tmp_path: Path, broker: Broker) -> None:
    """The real service twice (RouterApp, its MQTT link and parts): calls routed by one are
    in the other's /v1/forces and caps; an end told to the other frees them; a clean stop
    leaves them counted down, not dropped."""
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(make_config(tmp_path / name, mqtt_port=broker.port))
    async with running_service(paths[1], {**environ(), "OVERFLOW_INSTANCE": "router-b"}) as b:
        async with running_service(paths[0],
                                   {**environ(), "OVERFLOW_INSTANCE": "router-a"}) as a:
            for api in (a, b):
                for force_id in api.service.config.forces:
                    await api.call("PUT", f"/v1/forces/{force_id}/override", "manager",
                                   json={"state": "down" if force_id == "met" else "normal",
                                         "reason": "test"})
            for n in range(5):
                status, decision = await a.call("POST", "/v1/route", "telephony",
                                                json={"call_id": f"c{n}", "service": "999",
                                                      "origin": "met"})
                assert status == 200 and decision["reason"] == "origin_down"
            await wait_for(lambda: sum(b.service.calls.ledger.total_aid.values()) == 5)
            assert await _aid(b) == 5 == await _aid(a)
            status, _ = await b.call("POST", "/v1/calls/c0/end", "telephony", json={})
            assert status == 204  # Kamailio told router b of a call router a routed
            await wait_for(lambda: sum(a.service.calls.ledger.aid.values()) == 4)
            await wait_for(lambda: sum(b.service.calls.ledger.total_aid.values()) == 4)
            assert await _aid(b) == 4
        # router a stopped cleanly with 4 calls in flight: they are still at partners
        peers = b.service.peers
        assert peers is not None
        await wait_for(lambda: peers.book.live(time.monotonic()) == (0, 1))
        assert await _aid(b) == 4  # counted down from now, not dropped
