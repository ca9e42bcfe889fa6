"""The fault matrix: each fault we can name, injected into a running router, with what was
measured — calls keep getting routes, accepted handoffs are never lost, and the service
recovers by itself and says so in its logs and metrics.

Real components only: the router on loopback, a partner CAD over HTTP, a private Mosquitto.
Timings are printed (`-s`), never asserted: benchmarks live in bench/.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from conftest import Broker
from fault_support import (
    FINAL_OK,
    Load,
    all_delivered,
    handoff_load,
    metric,
    route_load,
    router_with_cad,
    statuses,
)

from router.infra.clock import steady_wall

pytestmark = pytest.mark.timeout(120)


async def until(condition: Callable[[], bool], within_s: float) -> None:
    """Poll a condition, bounded (a link's state has no event to wait on)."""
    deadline = time.monotonic() + within_s
    for _ in range(int(within_s / 0.05) + 1):
        if condition() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["slow", "500", "garbage", "not_utf8", "drop"])
async def test_a_partner_cad_misbehaving(tmp_path: Path, fault: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with router_with_cad(tmp_path) as (api, cad):
        cad.mode = fault
        load = Load()
        await asyncio.gather(route_load(api, load, calls=200),
                             handoff_load(api, load, count=6))
        await asyncio.sleep(1.0)  # the fault meets retries and holds
        during = await statuses(api, load.handoffs)
        cad.mode = "ok"
        after = await all_delivered(api, load.handoffs)
        _, text = await api.call("GET", "/metrics")
    print(f"\n{fault}: routes {load.routes} (errors {load.route_errors}, p99 "
          f"{load.p99_ms():.1f} ms); handoffs {len(load.handoffs)} accepted; during the fault "
          f"{sorted(during.values())}; after {sorted(after.values())}; CAD deliveries "
          f"{sorted(cad.received.values())}")
    assert load.routes == 200 and load.route_errors == 0  # callers never noticed
    assert len(load.handoffs) == 6 and load.handoff_errors == 0
    assert all(s in FINAL_OK for s in after.values()), after  # none lost, none failed
    assert metric(text, "overflow_handoff_outcomes_total", destination="met",
                  status="delivered") >= 6
    if fault in ("garbage", "not_utf8"):  # a 2xx is a delivery, whatever its body says
        assert all(s in FINAL_OK for s in during.values()), during
        assert sorted(cad.received.values()) == [1] * 6  # delivered once: no redelivery
        assert "escalated" not in during.values()
    else:  # held while failing, drained once the CAD answers: and it says so
        assert not any(s in FINAL_OK for s in during.values()) or fault == "slow", during
        said = [r.getMessage() for r in caplog.records if r.name.startswith("router")]
        assert any("CAD unavailable" in m or "cannot take it now" in m for m in said), said


async def test_the_broker_killed_and_restarted(tmp_path: Path, broker: Broker,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Routing goes on while the broker is away; the link comes back by itself, says so,
    and publishes the retained states again (the broker kept none: no persistence)."""
    caplog.set_level(logging.INFO)
    async with router_with_cad(tmp_path, mqtt_port=broker.port) as (api, _):
        link = api.service.mqtt
        assert link is not None
        await until(lambda: link.connected, 10)
        broker.stop()
        await until(lambda: not link.connected, 10)
        load = Load()
        await route_load(api, load, calls=100, tag="away")
        gone_at = time.monotonic()
        broker.start()
        await until(lambda: link.connected, 30)
        back_s = time.monotonic() - gone_at
        reconnected = link.connected
        retained = {}
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe("overflow/state/#")
            async with asyncio.timeout(10):
                async for message in client.messages:
                    retained[str(message.topic)] = json.loads(bytes(message.payload))
                    if len(retained) == len(api.service.config.forces):
                        break
    print(f"\nbroker away: {load.routes} routes, {load.route_errors} errors, p99 "
          f"{load.p99_ms():.1f} ms; link back {back_s:.2f} s after the restart")
    assert load.routes == 100 and load.route_errors == 0 and reconnected
    assert retained["overflow/state/met"]["state"] == "normal"  # published again
    said = [r.getMessage() for r in caplog.records if r.name == "router.infra.mqtt_link"]
    assert any("lost" in m or "unreachable" in m for m in said), said
    assert said[-1].startswith("MQTT connected"), said


async def test_the_wall_clock_stepped_forward_and_back(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTP step of an hour forward must not escalate a P1 at once, nor one back hold it:
    deadlines are measured on a clock that only slews (router/infra/clock.py)."""
    step = [0.0]
    monkeypatch.setattr(steady_wall, "_wall", lambda: time.time() + step[0])
    async with router_with_cad(tmp_path, deadlines_s={"P1": 3, "P2": 300, "P3": 1800,
                                                      "P4": 7200}) as (api, cad):
        cad.mode = "500"  # never delivered: only the deadline can escalate it
        load = Load()
        await handoff_load(api, load, count=3, priority="P1")
        accepted = time.monotonic()
        step[0] = 3600.0  # forward an hour
        await asyncio.sleep(1.0)
        after_forward = await statuses(api, load.handoffs)
        step[0] = -3600.0  # and back two
        escalated_after = None
        while time.monotonic() < accepted + 10:
            if all(s == "escalated" for s in (await statuses(api, load.handoffs)).values()):
                escalated_after = time.monotonic() - accepted
                break
            await asyncio.sleep(0.05)
    print(f"\nclock steps: after +1 h {sorted(after_forward.values())}; P1s escalated "
          f"{escalated_after} s after acceptance (deadline 3 s)")
    assert "escalated" not in after_forward.values()
    assert escalated_after is not None and 2.5 < escalated_after < 5.0


async def test_reloads_during_load(tmp_path: Path) -> None:
    """Route and handoff load while the config is reloaded over and over: every call gets a
    route, every reload applies, every handoff is delivered. Route latency while reloading is
    printed beside that without reloads (the file is parsed off the loop)."""
    async with router_with_cad(tmp_path) as (api, _):
        quiet = Load()
        await route_load(api, quiet, calls=200, tag="quiet", pause_s=0.002)
        busy = Load()
        reloads: list[int] = []

        async def reload_loop() -> None:
            for _ in range(15):
                status, _ = await api.call("POST", "/v1/admin/reload", "manager")
                reloads.append(status)

        await asyncio.gather(route_load(api, busy, calls=400, tag="busy", pause_s=0.002),
                             handoff_load(api, busy, count=10), reload_loop())
        after = await all_delivered(api, busy.handoffs)
    print(f"\nroute p99 without reloads {quiet.p99_ms():.1f} ms, during 15 reloads "
          f"{busy.p99_ms():.1f} ms (max {max(busy.route_latencies) * 1000:.1f} ms)")
    assert reloads == [200] * 15
    assert busy.route_errors == 0 and busy.routes == 400
    assert all(s in FINAL_OK for s in after.values()), after
