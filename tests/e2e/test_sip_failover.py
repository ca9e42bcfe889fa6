"""999 calls through a real Kamailio asking the real router, with sipp on both ends.

The Met's centre fails mid-run (its SIP answering and its CAD health URL both go) and comes
back; the caller's log says which centre answered every call. Then, with the router stopped
or hung, Kamailio's own fallback must still get every call answered, and quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from conftest import need
from sipkit import (
    PACKAGES,
    Centre,
    FakeRouter,
    Proxy,
    Router,
    place_calls,
    tcp_port,
    tools_present,
    udp_port,
    write_forces,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(150)]

RATE = 5  # calls per second: a busy hour at the Met is about 0.2/s; this is a surge
HOLD_MS = 1000
NORMAL_S, OUTAGE_S, AFTER_S = 6.0, 8.0, 10.0
SETTLE_S = 3.0  # recovery: healthy_threshold x interval, then a 2-step ramp of 1 s


BREAKER_S = 2  # the proxy's circuit breaker, short to keep the test short


@contextlib.asynccontextmanager
async def edge(tmp: Path, router_url: str | None = None, more_routers: Sequence[str] = (),
               plan_max_age_s: int = 300,
               ) -> AsyncIterator[tuple[dict[str, Centre], Router, Proxy]]:
    """Centres, the router and Kamailio; `router_url` points Kamailio elsewhere instead;
    `more_routers` are asked after the first."""
    centres = {f: Centre(f, udp_port(), tcp_port(), tmp) for f in ("met", "kent", "surrey")}
    forces = write_forces(tmp / "forces.yaml", centres, {"met": ["kent", "surrey"]}, tmp)
    router = Router(forces, tcp_port(), tmp)
    proxy = Proxy(forces, udp_port(), tmp, router_url or router.url, breaker_s=BREAKER_S,
                  more_routers=more_routers, plan_max_age_s=plan_max_age_s)
    try:
        for centre in centres.values():
            await centre.start()
        if router_url is None:
            await router.start()
        await proxy.start()
        yield centres, router, proxy
    finally:
        await proxy.stop()
        await router.stop()
        for centre in centres.values():
            await centre.fail()


async def test_met_fails_and_recovers_every_call_answered(tmp_path: Path) -> None:
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    async with edge(tmp_path) as (centres, router, proxy):
        await router.wait_states(lambda s: all(v == "normal" for v in s.values()))
        calls = int(RATE * (NORMAL_S + OUTAGE_S + AFTER_S))
        caller = asyncio.create_task(place_calls(
            proxy.port, tmp_path, origin="met", rate=RATE, calls=calls, hold_ms=HOLD_MS))
        await asyncio.sleep(NORMAL_S)
        failed_at = time.time()
        await centres["met"].fail()
        await router.wait_states(lambda s: s["met"] == "down")
        await asyncio.sleep(OUTAGE_S)
        back_at = time.time()
        await centres["met"].start()
        run = await caller

    assert run.created == calls and run.failed == 0 and run.successful == calls, run
    assert len(run.answered) == calls  # each call logged once, by the centre that answered it
    before = run.centres(end=failed_at)
    during = run.centres(failed_at, back_at)
    settled = run.centres(back_at + SETTLE_S)
    assert before and set(before) == {"met"}, before
    assert "met" not in during and during.get("kent", 0) > 0 and during.get("surrey", 0) > 0, \
        during  # surrey too: the router spread the load, not only the proxy's static fallback
    assert set(settled) == {"met"} and settled["met"] >= RATE * (AFTER_S - SETTLE_S) / 2, settled


async def test_router_stopped_kamailio_falls_back_home(tmp_path: Path) -> None:
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    async with edge(tmp_path) as (_, router, proxy):
        await router.wait_states(lambda s: all(v == "normal" for v in s.values()))
        await router.stop()
        calls = 20
        run = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=calls,
                                hold_ms=200)
        kent = await place_calls(proxy.port, tmp_path, origin="kent", rate=10, calls=5,
                                 hold_ms=200)

    assert run.successful == calls and run.failed == 0, run
    assert run.centres() == {"met": calls}  # home, from the proxy's own table
    assert kent.successful == 5 and kent.centres() == {"kent": 5}, kent
    # a refused connection falls back at once, well inside the router's 1 s timeout
    assert max(a.setup_s for a in run.answered) < 0.5, run.answered


async def test_router_hung_breaker_sends_calls_home_then_closes(tmp_path: Path) -> None:
    """A router that takes queries and never answers costs the calls already asking it the
    1 s timeout; then the breaker sends calls home without asking, one call at a time probes,
    and once the router answers again calls follow it again."""
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    fake = FakeRouter()
    async with fake.serving() as url, edge(tmp_path, router_url=url) as (centres, _, proxy):
        fake.answer = f"sip:999@127.0.0.1:{centres['kent'].sip_port}"
        started = time.time()
        hung = await place_calls(proxy.port, tmp_path, origin="met", rate=20, calls=60,
                                 hold_ms=200)
        asked_while_hung = fake.asked
        fake.hung = False
        await asyncio.sleep(BREAKER_S + 1)
        back = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=10,
                                 hold_ms=200)

    assert hung.successful == 60 and hung.failed == 0, hung
    assert hung.centres() == {"met": 60}, hung.centres()  # home, from the proxy's own table
    # only the queries in flight when it hung (one per route worker), plus a probe or two
    assert asked_while_hung <= 8 + 3, asked_while_hung
    slow = [a for a in hung.answered if a.setup_s > 0.5]
    late_slow = [a for a in slow if a.at - a.setup_s > started + 2.0]
    assert slow and len(late_slow) <= 2, (len(slow), late_slow)  # after 2 s: probes only
    assert back.successful == 10 and back.centres() == {"kent": 10}, back.centres()


@pytest.mark.parametrize("code", [486, 503])
async def test_centre_answering_options_but_refusing_calls_is_ejected(tmp_path: Path,
                                                                       code: int) -> None:
    """A grey failure: the Met's centre answers OPTIONS (its probes pass) but refuses every
    call. Kamailio reports each refusal on the call's end; after `consecutive_failures` (5)
    the router ejects the Met and new calls go to its partners. 503 is retried by the proxy
    at the static alternative, so no caller fails; 486 reaches the caller."""
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    async with edge(tmp_path) as (centres, router, proxy):
        await router.wait_states(lambda s: all(v == "normal" for v in s.values()))
        await centres["met"].refuse_calls(code)
        await router.wait_states(lambda s: s["met"] == "normal")
        run = await place_calls(proxy.port, tmp_path, origin="met", rate=5, calls=20,
                                hold_ms=200)
        states = await router.states()
        async with aiohttp.ClientSession() as session, \
                session.get(f"{router.url}/metrics") as resp:
            metrics = await resp.text()

    failed_at_met = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("overflow_call_outcomes_total{")
                        and 'destination="met"' in line and 'outcome="failed"' in line)
    assert states["met"] == "down", states  # ejected, though its OPTIONS are answered
    assert 'overflow_outlier_ejections_total{force="met"} 1.0' in metrics
    assert 5 <= failed_at_met <= 7, failed_at_met  # 5 in a row, and any already on their way
    assert run.created == 20
    if code == 503:  # retried by the proxy at the static alternative: every caller answered
        assert run.failed == 0 and run.successful == 20, run
    else:  # 486 is final for the caller: only those sent to the Met before its ejection
        assert run.failed == failed_at_met and run.successful == 20 - run.failed, run
    assert "met" not in run.centres(), run.centres()


@pytest.mark.timeout(60)
async def test_second_router_answers_when_the_first_is_killed(tmp_path: Path) -> None:
    """Two routers: the real one is SIGKILLed, and calls get the second one's answer (a stand-in
    answering Surrey, where neither the Met's home nor its static alternative Kent would send
    them), at once: a refused connection costs nothing and the first's breaker opens."""
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    second = FakeRouter(hung=False)
    async with second.serving() as url, \
            edge(tmp_path, more_routers=[url]) as (centres, router, proxy):
        second.answer = f"sip:999@127.0.0.1:{centres['surrey'].sip_port}"
        await router.wait_states(lambda s: all(v == "normal" for v in s.values()))
        first = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=5,
                                  hold_ms=200)
        assert router.proc is not None
        os.killpg(router.proc.pid, signal.SIGKILL)
        await router.proc.wait()
        after = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=20,
                                  hold_ms=200)

    assert first.successful == 5 and first.centres() == {"met": 5}, first  # the first router
    assert second.asked >= 20, second.asked
    assert after.successful == 20 and after.failed == 0, after
    assert after.centres() == {"surrey": 20}, after.centres()
    assert max(a.setup_s for a in after.answered) < 0.5, after.answered


PLAN_AGE_S = 5


@pytest.mark.timeout(60)
async def test_no_router_answering_calls_follow_the_remembered_plan(tmp_path: Path) -> None:
    """Both routers stop after sending the Met's calls to Surrey: while their answers are younger
    than the age limit the Met's calls still go to Surrey, not home (the Met) and not Kent (the
    static alternative); Kent, with no answers remembered, goes home; once the plan is too old,
    the Met's calls go home too."""
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    routers = [FakeRouter(hung=False), FakeRouter(hung=False)]
    serving = [contextlib.AsyncExitStack(), contextlib.AsyncExitStack()]
    urls = [await stack.enter_async_context(r.serving())
            for stack, r in zip(serving, routers, strict=True)]
    try:
        async with edge(tmp_path, router_url=urls[0], more_routers=urls[1:],
                        plan_max_age_s=PLAN_AGE_S) as (centres, _, proxy):
            for r in routers:
                r.answer = f"sip:999@127.0.0.1:{centres['surrey'].sip_port}"
            learnt = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=5,
                                       hold_ms=200)
            learnt_at = time.time()
            for stack in serving:
                await stack.aclose()
            remembered = await place_calls(proxy.port, tmp_path, origin="met", rate=10,
                                           calls=10, hold_ms=200)
            kent = await place_calls(proxy.port, tmp_path, origin="kent", rate=10, calls=3,
                                     hold_ms=200)
            assert time.time() - learnt_at < PLAN_AGE_S, "too slow to test the plan's age"
            await asyncio.sleep(max(0.0, learnt_at + PLAN_AGE_S + 1.5 - time.time()))
            aged = await place_calls(proxy.port, tmp_path, origin="met", rate=10, calls=5,
                                     hold_ms=200)
    finally:
        for stack in serving:
            await stack.aclose()

    assert learnt.centres() == {"surrey": 5}, learnt.centres()
    assert remembered.successful == 10 and remembered.centres() == {"surrey": 10}, remembered
    assert max(a.setup_s for a in remembered.answered) < 0.5, remembered.answered
    assert kent.successful == 3 and kent.centres() == {"kent": 3}, kent.centres()
    assert aged.successful == 5 and aged.centres() == {"met": 5}, aged.centres()
