"""999 calls through a real Kamailio asking the real router, with sipp on both ends.

The Met's centre fails mid-run (its SIP answering and its CAD health URL both go) and comes
back; the caller's log says which centre answered every call. Then, with the router stopped,
Kamailio's own fallback must still get every call answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import need
from sipkit import (
    PACKAGES,
    Centre,
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


@contextlib.asynccontextmanager
async def edge(tmp: Path) -> AsyncIterator[tuple[dict[str, Centre], Router, Proxy]]:
    centres = {f: Centre(f, udp_port(), tcp_port(), tmp) for f in ("met", "kent", "surrey")}
    forces = write_forces(tmp / "forces.yaml", centres, {"met": ["kent", "surrey"]}, tmp)
    router = Router(forces, tcp_port(), tmp)
    proxy = Proxy(forces, udp_port(), tmp, router.url)
    try:
        for centre in centres.values():
            await centre.start()
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
