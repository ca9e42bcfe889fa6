"""The service as a whole: MQTT outputs, SIGHUP reload of a real process, and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import yaml
from conftest import Broker, free_port, private_broker
from service_support import TOKENS, environ, make_config, running_service

from router.config import load_config
from router.http.app import RouterApp
from router.infra import metrics, supervise

ROOT = Path(__file__).resolve().parent.parent


async def test_state_and_routing_are_published_retained(tmp_path: Path, broker: Broker) -> None:
    async with running_service(make_config(tmp_path, mqtt_port=broker.port)) as api:
        for force in api.service.config.forces:
            await api.call("PUT", f"/v1/forces/{force}/override", "manager",
                           json={"state": "normal", "reason": "test"})
        await api.call("PUT", "/v1/forces/met/override", "manager",
                       json={"state": "down", "reason": "CAD crash"})
        await asyncio.sleep(1.5)  # one routing-publisher round
        # a late subscriber still learns the current state and plan: both are retained
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
            await client.subscribe("overflow/state/met")
            await client.subscribe("overflow/routing/met/999")
            seen: dict[str, dict[str, object]] = {}
            async with asyncio.timeout(5):
                async for message in client.messages:
                    seen[str(message.topic)] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    if len(seen) == 2:
                        break
    assert seen["overflow/state/met"]["state"] == "down"
    assert seen["overflow/state/met"]["reason"]
    routing = seen["overflow/routing/met/999"]
    destinations = {d["destination"] for d in routing["destinations"]}  # type: ignore[union-attr,index]
    assert destinations == {"kent", "surrey", "essex", "tvp", "herts", "city"}


async def _retained(broker: Broker, pattern: str, count: int) -> dict[str, dict[str, Any]]:
    """The first `count` retained messages on `pattern` a fresh subscriber gets."""
    seen: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
        await client.subscribe(pattern)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert message.retain, (str(message.topic), bytes(message.payload))
                seen[str(message.topic)] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if len(seen) == count:
                    return seen
    return seen


async def test_a_reload_moves_mqtt_to_a_new_broker_and_the_audit_to_a_new_file(
        tmp_path: Path, broker: Broker) -> None:
    """No restart for new broker settings: the link reconnects, telemetry is read from the new
    broker, and the retained states and routing are there for late subscribers at once."""
    path = make_config(tmp_path, mqtt_port=broker.port)
    with private_broker() as other:
        async with running_service(path) as api:
            link = api.service.mqtt
            assert link is not None
            for force in api.service.config.forces:
                await api.call("PUT", f"/v1/forces/{force}/override", "manager",
                               json={"state": "normal", "reason": "test"})
            await api.call("PUT", "/v1/forces/met/override", "manager",
                           json={"state": "down", "reason": "CAD crash"})

            raw = yaml.safe_load(path.read_text())
            raw["mqtt"].update(port=other.port, prefix="force-net/")
            raw["service"]["audit_log"] = str(tmp_path / "audit-2.jsonl")
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            status, body = await api.call("POST", "/v1/admin/reload", "manager")
            assert (status, body["restart_required"]) == (200, []), body
            for _ in range(100):
                if link.connections >= 2:
                    break
                await asyncio.sleep(0.05)
            assert link.connections == 2 and link.settings.port == other.port
            for _ in range(100):  # everything is published again on the new connection
                if link.pending == 0:
                    break
                await asyncio.sleep(0.05)

            states = await _retained(other, "force-net/state/+", 8)
            assert states["force-net/state/met"]["state"] == "down"
            await asyncio.sleep(1.5)  # one routing-publisher round
            routing = await _retained(other, "force-net/routing/met/999", 1)
            assert routing["force-net/routing/met/999"]["destinations"]

            await api.call("DELETE", "/v1/forces/kent/override", "manager")
            async with aiomqtt.Client(other.host, other.port, timeout=5) as ops:
                await ops.publish("force-net/centres/kent/telemetry", json.dumps(
                    {"ts": time.time(), "telephony_up": False, "cad_up": True,
                     "calls_waiting": 0, "handlers_available": 5, "handlers_on_duty": 40,
                     "oldest_wait_s": 0.0}).encode())
                for _ in range(100):
                    _, forces = await api.call("GET", "/v1/forces", "viewer")
                    if forces["forces"]["kent"]["state"] == "down":
                        break
                    await asyncio.sleep(0.05)
            assert forces["forces"]["kent"]["state"] == "down"  # read from the new broker
    moved = [json.loads(line) for line in (tmp_path / "audit-2.jsonl").read_text().splitlines()]
    assert any(e["force"] == "kent" and e["kind"] == "clear" for e in moved), moved


async def test_a_crashed_part_is_restarted_routing_goes_on_and_no_task_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part that fails is logged, counted and started again after a backoff; calls keep
    being routed meanwhile; and stopping the service still ends every task it started."""
    monkeypatch.setattr(supervise, "RESTART_S", (0.05, 0.1))
    path = make_config(tmp_path)
    router_app = RouterApp(load_config(path), path, environ())
    crashes = 0
    expire = router_app.calls.expire

    def broken(limit: int = 100) -> int:
        nonlocal crashes
        if crashes < 2:
            crashes += 1
            raise RuntimeError("the ledger is broken")
        return expire(limit)

    monkeypatch.setattr(router_app.calls, "expire", broken)
    restarts = metrics.TASK_RESTARTS.labels("expiry")
    before_restarts = restarts._value.get()
    before = asyncio.all_tasks()
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(router_app.run("127.0.0.1", 0, stop, ready.set_result))
    port = await asyncio.wait_for(ready, 10)
    async with aiohttp.ClientSession() as session:
        for n in range(40):  # about 4 s: the expiry sweep runs every second, and fails twice
            async with session.post(f"http://127.0.0.1:{port}/v1/route", json={
                    "call_id": f"c{n}", "service": "999", "origin": "met"},
                    headers={"Authorization": f"Bearer {TOKENS['telephony']}"}) as resp:
                assert resp.status == 200
            await asyncio.sleep(0.1)
    assert crashes == 2 and restarts._value.get() == before_restarts + 2
    stop.set()
    await asyncio.wait_for(task, 15)
    assert router_app.runtime.desk is None
    assert asyncio.all_tasks() == before, "a background task outlived the service"


async def _get(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, object]:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


async def test_sighup_reloads_a_running_process_and_refuses_a_bad_config(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "run", "--config", str(config), "--port", str(port),
        env={**os.environ, **environ()}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    viewer = "t-viewer-secret"
    url = f"http://127.0.0.1:{port}/v1/forces"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(100):
                try:
                    status, body = await _get(session, url, viewer)
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            assert status == 200
            good = config.read_text()
            config.write_text(good.replace("handlers_on_duty: 120", "handlers_on_duty: 125"))
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            _, body = await _get(session, url, viewer)
            assert body["forces"]["met"]["capacity"]["handlers_on_duty"] == 125  # type: ignore[index]
            config.write_text("version: 1\nforces: {met: {name: ''}}\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            status, body = await _get(session, url, viewer)
            assert status == 200  # still serving, on the last good config
            assert body["forces"]["met"]["capacity"]["handlers_on_duty"] == 125  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    log = stderr.decode()
    assert "SIGHUP reload refused" in log
    assert f"{config}:2: forces.met.centre: required key is missing" in log


def test_demo_detects_the_met_outage_and_narrates_it() -> None:
    """`make demo` is the README's first command: it must keep working."""
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "router", "demo", "--port", str(port), "--duration", "27"],
        capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert f"dashboard: http://127.0.0.1:{port}/#token=" in text
    assert "INJECTED: the Met's CAD and call handling fail" in text
    assert "met: normal → DOWN" in text, text[-3000:]
    down_line = next(line for line in text.splitlines() if "met: normal → DOWN" in line)
    assert "kent" in down_line and "surrey" in down_line
    assert "Traceback" not in out.stderr
