"""Crash safety: the real router process (`python -m router run`) is SIGKILLed again and again
while partners submit handoffs; after the restarts every accepted handoff has reached the
destination's CAD (a real HTTP endpoint here) exactly once — none lost, none duplicated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import ROOT, free_port
from handoff_support import config_data, incident

PARTNERS = ("kent", "essex", "surrey")
PER_PARTNER = 40
KILLS = 5
BUDGET_S = 60.0  # the whole test, bounded


class CountingCad:
    """Met's CAD: creates one incident per Idempotency-Key, counts every request."""

    def __init__(self) -> None:
        self.created: dict[str, str] = {}  # key -> incident_id
        self.requests: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = request.headers["Idempotency-Key"]
        self.requests[key] += 1
        await asyncio.sleep(0.01)  # slow enough that kills land mid-delivery
        duplicate = key in self.created
        self.created.setdefault(key, body["extension"]["overflowRouter"]["incident"]
                                ["incident_id"])
        return web.json_response({"reference": key[:8], "duplicate": duplicate},
                                 status=200 if duplicate else 201)


@pytest.fixture
async def cad() -> AsyncIterator[tuple[CountingCad, str]]:
    counting = CountingCad()
    app = web.Application()
    app.router.add_post("/incidents", counting.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield counting, f"http://127.0.0.1:{port}/incidents"
    finally:
        await runner.cleanup()


class Router:
    """The service as a child process, started and SIGKILLed at will."""

    def __init__(self, config: Path, port: int, env: dict[str, str], log: Path):
        self.args = [sys.executable, "-m", "router", "run", "--config", str(config),
                     "--port", str(port)]
        self.base = f"http://127.0.0.1:{port}"
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, cwd=ROOT, env=self.env, stdout=out, stderr=out)
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(self.base + "/healthz") as resp:
                        if resp.status == 200:
                            return
                if self.proc.returncode is not None:
                    raise AssertionError(f"router exited: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def partner(session: aiohttp.ClientSession, base: str, force: str, token: str,
                  accepted: dict[str, str], deadline: float) -> None:
    """Submit incidents one after another, each retried until the router says 200/202, as
    a partner's CAD would: a refused connection is not an answer."""
    for n in range(PER_PARTNER):
        body = incident(n, frm=force, to="met", priority=random.choice(["P1", "P2", "P3"]))
        while time.monotonic() < deadline:
            try:
                async with session.post(base + "/v1/handoffs", json=body,
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
                    if resp.status in (200, 202):
                        accepted[(await resp.json())["id"]] = body["incident_id"]
                        break
                    assert resp.status >= 500, await resp.text()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
        await asyncio.sleep(random.uniform(0, 0.02))


@pytest.mark.services
async def test_sigkill_loses_and_duplicates_nothing(tmp_path: Path, store_url: str,
                                                    cad: tuple[CountingCad, str]) -> None:
    counting, cad_url = cad
    data = config_data(tmp_path, store=store_url, cads={"met": {"adapter": "http_json",
                       "options": {"url": cad_url, "timeout_s": 2}}}, max_concurrency=8)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    tokens = {f: f"token-{f}" for f in PARTNERS}
    env = {**os.environ, "OVERFLOW_TOKEN_VIEWER": "viewer-token",
           **{f"OVERFLOW_TOKEN_PARTNER_{f.upper()}": t for f, t in tokens.items()}}
    router = Router(config, free_port(), env, tmp_path / "router.log")
    deadline = time.monotonic() + BUDGET_S
    accepted: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await router.start(session)
        try:
            partners = [asyncio.create_task(partner(session, router.base, f, tokens[f],
                                                    accepted, deadline)) for f in PARTNERS]
            for _ in range(KILLS):
                await asyncio.sleep(random.uniform(0.3, 0.7))
                await router.kill()
                await asyncio.sleep(random.uniform(0.0, 0.2))
                await router.start(session)
            await asyncio.gather(*partners)
            assert len(accepted) == len(PARTNERS) * PER_PARTNER, "partners ran out of time"
            statuses: dict[str, str] = {}
            while time.monotonic() < deadline:
                statuses = await all_statuses(session, router.base)
                if set(statuses.values()) == {"delivered"} and len(statuses) == len(accepted):
                    break
                await asyncio.sleep(0.05)
        finally:
            await router.stop()
    assert set(counting.created) == set(accepted), "lost or unexpected handoffs"
    # one incident per idempotency key, and one key per incident: nothing created twice
    assert sorted(counting.created.values()) == sorted(accepted.values())
    assert statuses == dict.fromkeys(accepted, "delivered")
    redelivered = sum(n - 1 for n in counting.requests.values())
    print(f"\n{len(accepted)} handoffs across {KILLS} SIGKILLs: all delivered once; "
          f"{redelivered} redeliveries absorbed by the idempotency key")


async def all_statuses(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    async with session.get(base + "/v1/handoffs?to=met&limit=1000",
                           headers={"Authorization": "Bearer viewer-token"}) as resp:
        body: dict[str, Any] = json.loads(await resp.text())
    return {h["id"]: h["status"] for h in body["handoffs"]}
