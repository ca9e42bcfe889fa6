"""A running router with a real partner CAD whose misbehaviour a test switches, and load that
measures what callers and partners see meanwhile (tests/test_faults.py, tests/test_soak.py).
Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from conftest import free_port, served
from handoff_support import incident
from service_support import Running, make_config, running_service

FINAL_OK = {"delivered", "acknowledged", "completed"}


@dataclass
class FaultyCad:
    """A partner's CAD over HTTP (the `http_json` adapter's peer). `mode`: ok, slow, 500,
    garbage (2xx, not JSON), not_utf8 (2xx, bytes that are not UTF-8), drop (accepts the
    connection, reads the request, closes without answering)."""

    mode: str = "ok"
    received: dict[str, int] = field(default_factory=dict)  # body -> deliveries

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = (await request.read()).decode()  # the same handoff is the same body, retried
        mode = self.mode
        if mode == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # aiohttp drops the request without an answer
        if mode == "500":
            return web.Response(status=500, text="internal error")
        if mode == "slow":
            await asyncio.sleep(5)
        self.received[key] = self.received.get(key, 0) + 1
        if mode == "garbage":
            return web.Response(status=200, body=b"\x00<html>not json at all",
                                content_type="text/html")
        if mode == "not_utf8":
            return web.Response(status=200, body=b'{"reference": "\xff\xfe\xfa"}',
                                content_type="application/json")
        return web.json_response({"reference": f"CAD-{len(self.received)}"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/incidents", self.handle)
        return app


def faults_config(tmp: Path, cad_port: int, *, mqtt_port: int | None = None,
                  **handoff: Any) -> Path:
    """The bundled forces without probes; the Met's CAD is the faulty one, retries quick."""
    path = make_config(tmp, mqtt_port=mqtt_port)
    raw = yaml.safe_load(path.read_text())
    raw["forces"]["met"]["cad"] = {"adapter": "http_json", "options": {
        "url": f"http://127.0.0.1:{cad_port}/incidents", "timeout_s": 0.5}}
    raw["handoff"].update({"retry": {"attempts": 2, "initial_s": 0.05, "max_s": 0.2,
                                     "attempt_timeout_s": 1.0, "hold_probe_s": 0.3},
                           **handoff})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def router_with_cad(tmp: Path, **kw: Any) -> AsyncIterator[tuple[Running, FaultyCad]]:
    cad = FaultyCad()
    async with served(cad.app()) as port, \
            running_service(faults_config(tmp, port, **kw)) as api:
        for force in api.service.config.forces:
            await api.call("PUT", f"/v1/forces/{force}/override", "manager",
                           json={"state": "normal", "reason": "fault test"})
        yield api, cad


@dataclass
class Load:
    """What callers and partners got while a fault was on."""

    routes: int = 0
    route_errors: int = 0
    route_latencies: list[float] = field(default_factory=list)
    handoffs: list[str] = field(default_factory=list)  # ids accepted (202/200)
    handoff_errors: int = 0

    def p99_ms(self) -> float:
        ordered = sorted(self.route_latencies) or [0.0]
        return ordered[min(round(0.99 * (len(ordered) - 1)), len(ordered) - 1)] * 1000


async def route_load(api: Running, load: Load, *, calls: int, pause_s: float = 0.005,
                     tag: str = "r") -> None:
    """`calls` 999 calls from the Met, each ended at once; counts every answer."""
    for n in range(calls):
        started = time.perf_counter()
        status, body = await api.call("POST", "/v1/route", "telephony", json={
            "call_id": f"{tag}-{n}", "service": "999", "origin": "met"})
        load.route_latencies.append(time.perf_counter() - started)
        load.routes += 1
        if status != 200 or not body.get("destination"):
            load.route_errors += 1
        else:
            await api.call("POST", f"/v1/calls/{tag}-{n}/end", "telephony")
        await asyncio.sleep(pause_s)


async def handoff_load(api: Running, load: Load, *, count: int, first: int = 1,
                       priority: str = "P2", pause_s: float = 0.02) -> None:
    """`count` handoffs from Kent to the Met; ids of those accepted go into `load`."""
    for n in range(first, first + count):
        status, body = await api.call("POST", "/v1/handoffs", "partner:kent",
                                      json=incident(n, priority=priority))
        if status in (200, 202):
            load.handoffs.append(body["id"])
        else:
            load.handoff_errors += 1
        await asyncio.sleep(pause_s)


async def statuses(api: Running, ids: list[str]) -> dict[str, str]:
    out = {}
    for hid in ids:
        status, body = await api.call("GET", f"/v1/handoffs/{hid}", "viewer")
        out[hid] = body.get("status", f"http {status}") if isinstance(body, dict) else str(status)
    return out


async def all_delivered(api: Running, ids: list[str], within_s: float = 20.0) -> dict[str, str]:
    """Wait (bounded) until every handoff is delivered or further; returns the last statuses."""
    deadline = time.monotonic() + within_s
    while True:
        now = await statuses(api, ids)
        if all(s in FINAL_OK for s in now.values()) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


__all__ = ["FaultyCad", "Load", "all_delivered", "free_port", "handoff_load", "metric",
           "route_load", "router_with_cad", "statuses"]
