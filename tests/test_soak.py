"""A bounded soak: the router as its own process under steady route and handoff load, a fault
injected every few seconds (the partner CAD failing in each way we know, the broker killed
and restarted, reloads); its memory (RSS) and open file descriptors must stay flat and no
accepted handoff may be lost. `make soak` runs it longer (OVERFLOW_SOAK_S)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, Broker, free_port, served, wait_for_port
from fault_support import FINAL_OK, FaultyCad, faults_config
from service_support import TOKENS, environ

SOAK_S = float(os.environ.get("OVERFLOW_SOAK_S", "150"))  # a few minutes in CI
FAULT_EVERY_S = 3.0
WARM_S = 10.0  # the "start" figures are taken this far in: imports done, pools open
FAULTS = ("500", "ok", "drop", "ok", "garbage", "slow", "ok", "not_utf8", "broker", "ok",
          "reload")

pytestmark = pytest.mark.timeout(SOAK_S + 120)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_soak(tmp_path: Path, broker: Broker) -> None:
    cad = FaultyCad()
    async with served(cad.app()) as cad_port:
        path = faults_config(tmp_path, cad_port, mqtt_port=broker.port)
        port = free_port()
        log = (tmp_path / "router.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "run", "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port), cwd=ROOT, env={**os.environ, **environ()}, stdout=log,
            stderr=log)
        base = f"http://127.0.0.1:{port}"
        auth = {role: {"Authorization": f"Bearer {t}"} for role, t in TOKENS.items()}
        counts = {"routes": 0, "route_errors": 0, "handoffs": 0, "handoff_errors": 0,
                  "faults": 0}
        accepted: list[str] = []
        try:
            await asyncio.to_thread(wait_for_port, port, 20)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                for force in ("met", "kent", "surrey", "essex", "sussex", "herts", "tvp",
                              "city"):
                    await http.put(f"{base}/v1/forces/{force}/override", headers=auth[
                        "manager"], json={"state": "normal", "reason": "soak"})
                stop = time.monotonic() + SOAK_S

                async def routes() -> None:
                    n = 0
                    while time.monotonic() < stop and n < 1_000_000:
                        n += 1
                        async with http.post(f"{base}/v1/route", headers=auth["telephony"],
                                             json={"call_id": f"s{n}", "service": "999",
                                                   "origin": "met"}) as r:
                            counts["routes"] += 1
                            counts["route_errors"] += r.status != 200
                        async with http.post(f"{base}/v1/calls/s{n}/end",
                                             headers=auth["telephony"],
                                             json={"outcome": "answered"}):
                            pass
                        await asyncio.sleep(0.01)

                async def handoffs() -> None:
                    from handoff_support import incident
                    n = 0
                    while time.monotonic() < stop and n < 100_000:
                        n += 1
                        async with http.post(f"{base}/v1/handoffs", headers=auth[
                                "partner:kent"], json=incident(n, priority="P2")) as r:
                            counts["handoffs"] += 1
                            if r.status in (200, 202):
                                accepted.append((await r.json())["id"])
                            else:
                                counts["handoff_errors"] += 1
                        await asyncio.sleep(0.1)

                async def faults() -> None:
                    i = 0
                    while time.monotonic() < stop - FAULT_EVERY_S and i < 100_000:
                        fault = FAULTS[i % len(FAULTS)]
                        i += 1
                        counts["faults"] += 1
                        if fault == "broker":
                            await asyncio.to_thread(broker.stop)
                            await asyncio.sleep(1)
                            await asyncio.to_thread(broker.start)
                        elif fault == "reload":
                            await http.post(f"{base}/v1/admin/reload", headers=auth["manager"])
                        else:
                            cad.mode = fault
                        await asyncio.sleep(FAULT_EVERY_S)
                    cad.mode = "ok"

                samples: list[tuple[int, int]] = []

                async def sample() -> None:  # first once the load and pools are warm
                    await asyncio.sleep(WARM_S)
                    samples.append((rss_kib(proc.pid), fds(proc.pid)))

                await asyncio.gather(routes(), handoffs(), faults(), sample())
                start = samples[0]
                cad.mode = "ok"
                deadline = time.monotonic() + 60
                pending = list(accepted)
                while pending and time.monotonic() < deadline:
                    still = []
                    for hid in pending:
                        async with http.get(f"{base}/v1/handoffs/{hid}",
                                            headers=auth["viewer"]) as r:
                            if (await r.json()).get("status") not in FINAL_OK:
                                still.append(hid)
                    pending = still
                    await asyncio.sleep(0.5)
                end = (rss_kib(proc.pid), fds(proc.pid))
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
            log.close()
    print(f"\nsoak {SOAK_S:g} s: RSS {start[0] / 1024:.1f} -> {end[0] / 1024:.1f} MiB, "
          f"FDs {start[1]} -> {end[1]}, routes {counts['routes']} "
          f"(errors {counts['route_errors']}), handoffs {counts['handoffs']} accepted "
          f"{len(accepted)}, lost {len(pending)}, faults {counts['faults']}")
    assert counts["route_errors"] == 0 and counts["routes"] > 0
    assert counts["handoff_errors"] == 0 and len(accepted) == counts["handoffs"]
    assert pending == []  # lost = 0: every accepted handoff delivered
    assert end[1] - start[1] <= 10, (start, end)  # no descriptor leak
    assert end[0] - start[0] < 40 * 1024, (start, end)  # RSS flat, within 40 MiB of noise
