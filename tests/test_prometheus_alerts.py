"""A real Prometheus, scraping a running router with the shipped alert rules: the centre-down
alert fires when a centre is declared down and resolves when it is back; the CAD-down alert
fires when a centre's CAD probe fails while its phones answer, and resolves when the CAD does.

Prometheus runs from Debian's `prometheus` package on a free loopback port, storage in a temp
dir, scraping and evaluating every second, so the alerts' own `for: 30s` is what the test
waits for: both alerts are driven at once, and the test takes about 40 s."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import free_port, need, wait_for_port
from service_support import make_config, running_service

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
DEADLINE_S = 90.0  # from the fault to the last resolution; `for: 30s` plus a few evaluations


@contextlib.contextmanager
def prometheus(tmp: Path, target: str) -> Iterator[str]:
    """Debian's prometheus binary (not its service) with the shipped rules, on a free port."""
    binary = shutil.which("prometheus")
    need(binary is not None, "the prometheus binary", "Debian's prometheus package")
    assert binary is not None
    shutil.copy(ALERTS, tmp / "alerts.yml")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "external_labels": {"runbook_base": "https://ops.example/docs"}},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "overflow-router",
                            "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20)
        base = f"http://127.0.0.1:{port}"
        until = time.monotonic() + 20
        while True:  # the port opens before the storage is: /-/ready says when it is
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < until, "prometheus did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def kent_centre() -> AsyncIterator[tuple[int, int, dict[str, bool]]]:
    """Kent's centre as its probes see it: a TCP port for its phones (always answering) and a
    CAD health URL whose answer the test switches."""
    cad = {"up": True}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if cad["up"] else 503, text="cad")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    cad_port, phones_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", cad_port).start()
    phones = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", phones_port)
    try:
        yield phones_port, cad_port, cad
    finally:
        phones.close()
        await runner.cleanup()


async def firing(session: aiohttp.ClientSession, base: str) -> dict[tuple[str, str], str]:
    """(alertname, force) → state, for the alerts Prometheus holds now."""
    async with session.get(base + "/api/v1/alerts") as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
    return {(a["labels"]["alertname"], a["labels"].get("force", "")): a["state"]
            for a in body["data"]["alerts"]}


async def wait_until(what: str, check: Any, session: aiohttp.ClientSession, base: str,
                     deadline: float) -> float:
    start = time.monotonic()
    while time.monotonic() < deadline:
        if check(await firing(session, base)):
            return time.monotonic() - start
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: not within the deadline; alerts: "
                         f"{await firing(session, base)}")


@pytest.mark.timeout(110)
async def test_centre_and_cad_down_alerts_fire_and_resolve(tmp_path: Path) -> None:
    need(shutil.which("prometheus") is not None, "the prometheus binary",
         "Debian's prometheus package")
    async with kent_centre() as (phones_port, cad_port, cad):
        config = make_config(tmp_path)
        raw = yaml.safe_load(config.read_text())
        raw["forces"]["kent"]["centre"]["probes"] = [
            {"kind": "tcp", "target": f"127.0.0.1:{phones_port}", "component": "telephony"},
            {"kind": "http", "target": f"http://127.0.0.1:{cad_port}/health",
             "component": "cad"}]
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with running_service(config) as r:
            target = r.base.removeprefix("http://")
            with prometheus(tmp_path, target) as prom:
                async with aiohttp.ClientSession() as session:
                    # kent normal on its probes, its CAD up: no alert yet
                    await wait_until("kent normal", lambda _: r.service.watcher.snapshot
                                     .get("kent").state.value == "normal", session, prom,
                                     time.monotonic() + 15)
                    status, _ = await r.call("PUT", "/v1/forces/met/override", "manager",
                                             json={"state": "down", "reason": "fire drill"})
                    assert status == 200
                    cad["up"] = False
                    deadline = time.monotonic() + DEADLINE_S
                    fired = await wait_until(
                        "CentreDown and CentreCadDown firing",
                        lambda a: a.get(("CentreDown", "met")) == "firing"
                        and a.get(("CentreCadDown", "kent")) == "firing",
                        session, prom, deadline)
                    assert fired >= 29  # their `for: 30s` held, on a 1 s evaluation
                    alerts = await firing(session, prom)
                    assert ("CentreCadDown", "met") not in alerts  # met is down, not its CAD
                    status, _ = await r.call("PUT", "/v1/forces/met/override", "manager",
                                             json={"state": "normal", "reason": "back"})
                    assert status == 200
                    cad["up"] = True
                    resolved = await wait_until(
                        "both resolved",
                        lambda a: ("CentreDown", "met") not in a
                        and ("CentreCadDown", "kent") not in a,
                        session, prom, deadline)
                    print(f"fired after {fired:.1f} s, resolved {resolved:.1f} s after recovery")
                    assert resolved < 15
