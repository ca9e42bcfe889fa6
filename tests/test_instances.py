"""Several routers on one PostgreSQL, as real processes: the outbox is their shared queue (a
killed router's handoffs are delivered by another, each with its idempotency key) and one of
them leads (the lease passes on when the leader is killed or stops)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import Broker, free_port, served
from handoff_support import incident, wait_for
from service_support import (
    MANAGER,
    TOKENS,
    healthy_telemetry,
    make_config,
    router_process,
    until_up,
)

pytestmark = pytest.mark.timeout(120)


class Cad:
    """Met's CAD over HTTP: refuses (503) until opened, then records every delivery's key."""

    def __init__(self) -> None:
        self.open = False
        self.delay_s = 0.0
        self.keys: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self.delay_s)
        if not self.open:
            return web.json_response({"message": "CAD restarting"}, status=503)
        self.keys.append(request.headers["Idempotency-Key"])
        return web.json_response({"reference": f"MET-{len(self.keys)}"})


@contextlib.asynccontextmanager
async def met_cad() -> AsyncIterator[tuple[Cad, str]]:
    cad = Cad()
    app = web.Application()
    app.router.add_post("/incidents", cad.handle)
    async with served(app) as port:
        yield cad, f"http://127.0.0.1:{port}/incidents"


def configs(tmp: Path, dsn: str, cad_url: str | None, names: list[str],
            mqtt_port: int | None = None) -> list[Path]:
    paths = []
    for name in names:
        (tmp / name).mkdir()
        path = make_config(tmp / name, mqtt_port=mqtt_port)
        raw = yaml.safe_load(path.read_text())
        raw["handoff"].update(store=dsn, retry={"attempts": 1, "initial_s": 0.05, "max_s": 0.2,
                                                "attempt_timeout_s": 2, "hold_probe_s": 0.3})
        if cad_url is not None:
            raw["forces"]["met"]["cad"] = {"adapter": "http_json",
                                           "options": {"url": cad_url, "format": "incident"}}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        paths.append(path)
    return paths


class Routers:
    """Router processes by name, on their own ports, each named by OVERFLOW_INSTANCE."""

    def __init__(self, tmp: Path, paths: list[Path], names: list[str]) -> None:
        self.tmp = tmp
        self.paths = dict(zip(names, paths, strict=True))
        self.ports = {name: free_port() for name in names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stack = contextlib.ExitStack()

    def base(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def start(self, session: aiohttp.ClientSession, name: str) -> None:
        self.procs[name] = self.stack.enter_context(router_process(
            self.paths[name], self.ports[name], self.tmp / f"{name}.log",
            env={"OVERFLOW_INSTANCE": name}))
        await until_up(session, self.base(name))

    async def stop(self, name: str, how: signal.Signals) -> None:
        """Signal it and wait for it to exit, the event loop free meanwhile: the CAD in this
        process must go on answering the router as it stops."""
        proc = self.procs.pop(name)
        proc.send_signal(how)
        await asyncio.to_thread(proc.wait, 15)

    async def hand_over(self, session: aiohttp.ClientSession, name: str,
                        incidents: list[dict[str, Any]]) -> list[str]:
        """Kent hands the incidents to router `name`; the ids of the handoffs (all 202)."""
        ids = []
        for body in incidents:
            async with session.post(f"{self.base(name)}/v1/handoffs", json=body, headers={
                    "Authorization": f"Bearer {TOKENS['partner:kent']}"}) as resp:
                assert resp.status == 202, await resp.text()
                ids.append((await resp.json())["id"])
        return ids

    async def ready(self, session: aiohttp.ClientSession, name: str) -> dict[str, Any]:
        async with session.get(f"{self.base(name)}/readyz") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def leaders(self, session: aiohttp.ClientSession) -> list[str]:
        views = [await self.ready(session, name) for name in self.procs]
        return [view["instance"] for view in views if view["leader"]]


@contextlib.contextmanager
def routers(tmp: Path, paths: list[Path], names: list[str]) -> Iterator[Routers]:
    group = Routers(tmp, paths, names)
    with group.stack:
        yield group


async def test_a_killed_routers_handoffs_are_delivered_by_another(
        tmp_path: Path, pg_dsn: str) -> None:
    names = ["a", "b"]
    async with met_cad() as (cad, url), aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5)) as session:
        with routers(tmp_path, configs(tmp_path, pg_dsn, url, names), names) as group:
            for name in names:
                await group.start(session, name)
            accepted = await group.hand_over(session, "a", [
                incident(n, priority="P1" if n % 3 else "P2") for n in range(12)])
            await asyncio.sleep(1.5)  # a tries them and holds them: the CAD refuses
            assert not cad.keys
            await group.stop("a", signal.SIGKILL)
            cad.open = True
            killed = time.monotonic()
            await wait_for(lambda: set(accepted) <= set(cad.keys), 20)
            took = time.monotonic() - killed
            async with session.get(f"{group.base('b')}/metrics") as resp:
                metrics = await resp.text()
    assert set(cad.keys) == set(accepted)  # every one, and only once each: a never delivered
    assert len(cad.keys) == len(accepted)
    taken = next(line for line in metrics.splitlines()
                 if line.startswith("overflow_handoff_claims_taken_total"))
    assert float(taken.split()[-1]) >= len(accepted)
    assert took < 12, took  # a lease (5 s), a round (1 s), the CAD's breaker probe


async def test_a_router_stopping_cleanly_hands_over_nothing_a_cad_already_took(
        tmp_path: Path, pg_dsn: str) -> None:
    """SIGTERM while deliveries are in flight: they finish and are recorded before the claims
    are given up, so the router taking the rest sends none of them again."""
    names = ["a", "b"]
    async with met_cad() as (cad, url), aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5)) as session:
        cad.open, cad.delay_s = True, 0.3  # a slow CAD: deliveries are in flight at the stop
        with routers(tmp_path, configs(tmp_path, pg_dsn, url, names), names) as group:
            for name in names:
                await group.start(session, name)
            accepted = await group.hand_over(session, "a", [incident(n) for n in range(40)])
            await asyncio.sleep(0.5)
            await group.stop("a", signal.SIGTERM)
            await wait_for(lambda: set(accepted) <= set(cad.keys), 30)
    assert sorted(cad.keys) == sorted(accepted)  # each once


async def test_one_router_leads_and_another_takes_over_when_it_dies(
        tmp_path: Path, pg_dsn: str) -> None:
    names = ["a", "b", "c"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        with routers(tmp_path, configs(tmp_path, pg_dsn, None, names), names) as group:
            for name in names:
                await group.start(session, name)

            async def one_leader() -> bool:
                return len(await group.leaders(session)) == 1

            await wait_for(one_leader, 5)
            for how, within_s in ((signal.SIGKILL, 5.0), (signal.SIGTERM, 2.0)):
                leader = (await group.leaders(session))[0]
                await group.stop(leader, how)
                stopped = time.monotonic()
                await wait_for(one_leader, within_s)
                took = time.monotonic() - stopped
                assert (await group.leaders(session))[0] != leader
                assert took < within_s, (how, took)
                await group.start(session, leader)  # back, and not leading: the lease is held
                assert leader not in await group.leaders(session)
                assert len(await group.leaders(session)) == 1


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_declarations_and_the_plan_survive_every_router_stopping(
        tmp_path: Path, pg_dsn: str, broker: Broker, how: signal.Signals) -> None:
    """Both routers of a pair go (a site power cut, a bad rollout): brought back, both
    resume the manager's declaration and send the Met's first 999 to a partner."""
    names = ["a", "b"]
    partners = ["kent", "surrey", "essex", "tvp", "herts", "city", "sussex"]
    auth = {role: {"Authorization": f"Bearer {TOKENS[role]}"} for role in TOKENS}
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        paths = configs(tmp_path, pg_dsn, None, names, mqtt_port=broker.port)
        with routers(tmp_path, paths, names) as group:
            for name in names:
                await group.start(session, name)
            telemetry = asyncio.create_task(healthy_telemetry(broker.port, partners, stop))
            async with session.put(f"{group.base('b')}/v1/forces/met/override", json={
                    "state": "down", "reason": "CAD and phones failed"},
                    headers=auth["manager"]) as resp:
                assert resp.status == 200 and (await resp.json())["remembered"] is True
            await asyncio.sleep(6)  # the partners' states are saved every 5 s
            stop.set()
            await telemetry
            for name in names:
                await group.stop(name, how)
            for name in names:  # no telemetry now: the partners' last known states stand
                await group.start(session, name)
            views, decisions = [], []
            for n, name in enumerate(names):
                async with session.get(f"{group.base(name)}/v1/forces",
                                       headers=auth["viewer"]) as resp:
                    views.append((await resp.json())["forces"]["met"])
                async with session.post(f"{group.base(name)}/v1/route", json={
                        "call_id": f"first-{n}", "service": "999", "origin": "met"},
                        headers=auth["telephony"]) as resp:
                    decisions.append(await resp.json())
    for met in views:
        assert met["state"] == "down", met
        assert met["override"]["source"] == f"manager:{MANAGER}"
    for decision in decisions:
        assert decision["destination"] in partners and decision["reason"] != "last_resort"
