"""One source of truth for "is this force diverting": 22:28 on 25 March 2025, the Met's phones
answer but its CAD is down, and with `on_cad_down: overflow` every Met call goes to partners.
The API, `status`, the retained MQTT state, the partners' alert and the dashboard's data must
all say so — none may show a plain NORMAL while the calls go elsewhere."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import Broker
from service_support import Running, make_config, running_service

from router.tools import admin

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parent.parent


def telemetry(**over: Any) -> bytes:
    return json.dumps({"ts": time.time(), "telephony_up": True, "cad_up": True,
                       "calls_waiting": 0, "handlers_available": 20, "handlers_on_duty": 120,
                       "oldest_wait_s": 0.0, **over}).encode()


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check() if asyncio.iscoroutinefunction(check) else check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s")
        await asyncio.sleep(0.05)


async def met(api: Running) -> dict[str, Any]:
    _, body = await api.call("GET", "/v1/forces", "viewer")
    return body["forces"]["met"]  # type: ignore[no-any-return]


async def test_cad_down_with_overflow_is_diverting_in_every_view(
        tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_config(tmp_path, mqtt_port=broker.port)
    async with running_service(path) as api, \
            aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
        await client.subscribe("overflow/alerts")
        await client.subscribe("overflow/state/met")
        await eventually(lambda: api.service.mqtt is not None and api.service.mqtt.connected)
        await asyncio.sleep(0.2)  # the router's telemetry subscription follows its connect
        for force in api.service.config.forces:
            await client.publish(f"overflow/centres/{force}/telemetry", telemetry())

        async def met_normal() -> bool:
            return (await met(api))["state"] == "normal"

        await eventually(met_normal)
        await client.publish("overflow/centres/met/telemetry", telemetry(cad_up=False))

        async def diverting() -> dict[str, Any] | None:
            m = await met(api)
            return m if m["diverting"] else None

        m = await eventually(diverting)
        # the API: the state machine still says normal (phones answer), the plan does not
        assert m["state"] == "normal" and m["cad_up"] is False
        assert m["diversion"]["cause"] == "cad_down"
        assert m["diversion"]["reason"] == "origin_cad_down"
        assert m["diversion"]["share_diverted"] == 1.0
        assert m["headline"] == "diverting — CAD down"
        _, table = await api.call("GET", "/v1/routing-table", "viewer")
        assert all(s["destination"] != "met" and s["reason"] == "origin_cad_down"
                   for s in table["routing"]["met"]["999"])

        # `overflow-router status`, as a control-room manager runs it
        monkeypatch.setenv("OVERFLOW_TOKEN", api.tokens["viewer"])
        lines = (await admin.status(api.base)).splitlines()
        met_line = next(line for line in lines if line.startswith("met "))
        assert "diverting — CAD down" in met_line and "normal" not in met_line

        # MQTT: partners were alerted, and the retained state says why
        alert = state = None
        async with asyncio.timeout(10):
            async for message in client.messages:
                payload = json.loads(bytes(message.payload))
                if message.topic.matches("overflow/alerts") and payload["origin"] == "met":
                    alert = payload
                elif message.topic.matches("overflow/state/met") and payload.get("diverting"):
                    state = payload
                if alert and state:
                    break
        assert alert is not None and state is not None
        assert (alert["event"], alert["reason"], alert["cause"]) == \
            ("started", "origin_cad_down", "cad_down")
        assert alert["state"] == "normal" and "kent" in alert["partners"]
        assert state["state"] == "normal" and state["cad_up"] is False
        assert state["diversion"]["cause"] == "cad_down"
        assert state["headline"] == "diverting — CAD down"

        # the dashboard: served by the router, it shows the router's headline for each force
        status, page = await api.call("GET", "/")
        assert status == 200 and "f.headline" in page

        # and it stops when the CAD is back
        await client.publish("overflow/centres/met/telemetry", telemetry())

        async def back() -> bool:
            m = await met(api)
            return not m["diverting"] and m["diversion"] is None and m["headline"] == "normal"

        await eventually(back)
