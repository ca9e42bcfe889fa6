"""Running the real service in-process on a free loopback port, for API tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import yaml
from aiohttp.test_utils import TestClient, TestServer

from router.config import load_config
from router.http.app import RouterApp

ROOT = Path(__file__).resolve().parent.parent
ROUTER = [str(Path(sys.executable).parent / "overflow-router")]
MANAGER = "Insp. A. Test"  # the person the test manager token belongs to
TOKENS = {
    "telephony": "t-telephony-secret",
    "viewer": "t-viewer-secret",
    "manager": "t-manager-secret",
    "partner:kent": "t-kent-secret",
}


def make_config(tmp: Path, *, mqtt_port: int | None = None, **service: Any) -> Path:
    """The bundled forces, without probes (states come from declarations), in a temp dir."""
    raw = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    for force in raw["forces"].values():
        force["centre"]["probes"] = []
    raw["mqtt"] = {"enabled": mqtt_port is not None, "host": "127.0.0.1",
                   "port": mqtt_port or 1883}
    raw["service"].update(
        tokens=[{"env": f"TEST_TOKEN_{i}", "role": role,
                 **({"operator": MANAGER} if role == "manager" else {})}
                for i, role in enumerate(TOKENS)],
        audit_log=str(tmp / "audit.jsonl"), **service)
    raw["handoff"].update(store=f"sqlite:///{tmp / 'handoffs.db'}", spool_dir=str(tmp / "spool"))
    path = tmp / "forces.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def environ() -> dict[str, str]:
    return {f"TEST_TOKEN_{i}": token for i, token in enumerate(TOKENS.values())}


@dataclass
class Running:
    service: RouterApp
    base: str
    session: aiohttp.ClientSession
    config_path: Path
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def call(self, method: str, path: str, role: str | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = kwargs.pop("headers", {}) | (self.auth(role) if role else {})
        async with self.session.request(method, self.base + path, headers=headers,
                                        **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def in_test_client(config_path: Path) -> AsyncIterator[Running]:
    """The same app under aiohttp's own test server and client: its parts open and close with
    it (they are the app's cleanup contexts), but `run()` and its listening socket are not used."""
    config = load_config(config_path)
    service = RouterApp(config, config_path, environ())
    async with TestClient(TestServer(service.app)) as client:
        yield Running(service, str(client.make_url("")).rstrip("/"), client.session, config_path)


@contextlib.asynccontextmanager
async def running_service(config_path: Path,
                          env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    config = load_config(config_path)
    service = RouterApp(config, config_path, environ() if env is None else env)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.run("127.0.0.1", 0, stop, ready.set_result))
    try:
        port = await asyncio.wait_for(ready, 10)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Running(service, f"http://127.0.0.1:{port}", session, config_path)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.contextmanager
def router_process(config: Path, port: int, log: Path,
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The router as a real process (to be killed), with the test tokens and `env`."""
    with log.open("ab") as out:
        proc = subprocess.Popen([*ROUTER, "run", "--config", str(config), "--port", str(port)],
                                cwd=ROOT, env={**os.environ, **environ(), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def until_up(session: aiohttp.ClientSession, base: str, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError("router did not come up")


async def healthy_telemetry(port: int, forces: list[str], stop: asyncio.Event) -> None:
    """Partners' ACDs reporting in: plenty of handlers free."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        while not stop.is_set():
            for force in forces:
                await client.publish(f"overflow/centres/{force}/telemetry", json.dumps({
                    "ts": time.time(), "telephony_up": True, "cad_up": True,
                    "calls_waiting": 0, "handlers_available": 20, "handlers_on_duty": 40,
                    "oldest_wait_s": 0}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
