"""`/v1/route` over real HTTP on loopback: throughput, and latency at a fixed 1,000 routes/s.

The router runs as its own process (`overflow-router run`); load comes from another process
(wrk for throughput when installed, an open-loop aiohttp client for the fixed rate), so the
router's one event loop is measured, not the load generator's. The Met is declared down first so
most decisions take the overflow path, not the cheap home path.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
THROUGHPUT_S = 10
FIXED_RATE = 1000
FIXED_S = 10

WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local origins = {"met", "kent", "surrey", "essex"}
  local origin = origins[(counter % 4) + 1]
  local service = (counter % 3 == 0) and "101" or "999"
  return wrk.format("GET", "/v1/route?call_id=w" .. counter .. "-" .. math.random(1e9) ..
    "&service=" .. service .. "&origin=" .. origin .. "&format=text")
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    for force in raw["forces"].values():
        force["centre"]["probes"] = []  # no simulated centres here: states come from overrides
    raw["mqtt"]["enabled"] = False
    raw["service"]["tokens"] = [{"env": "BENCH_TOKEN_T", "role": "telephony"},
                                {"env": "BENCH_TOKEN_M", "role": "manager"}]
    raw["service"]["audit_log"] = str(tmp / "audit.jsonl")
    raw["service"]["max_call_duration_s"] = 5  # keep the ledger at a steady size under load
    raw["handoff"]["store"] = f"sqlite:///{tmp / 'handoffs.db'}"
    raw["handoff"]["spool_dir"] = str(tmp / "spool")
    path = tmp / "forces.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def _prepare(base: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}m"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for _ in range(100):
            try:
                async with session.get(f"{base}/healthz"):
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        for force in ("kent", "surrey", "essex", "tvp", "herts", "city", "sussex"):
            async with session.put(f"{base}/v1/forces/{force}/override", headers=headers,
                                   json={"state": "normal", "reason": "bench"}):
                pass
        async with session.put(f"{base}/v1/forces/met/override", headers=headers,
                               json={"state": "down", "reason": "bench: overflow path"}) as resp:
            assert resp.status == 200, await resp.text()


async def _fixed_rate(base: str, rate: int, seconds: int) -> tuple[list[float], int]:
    """Open loop: requests start on schedule whether or not earlier ones have finished."""
    headers = {"Authorization": f"Bearer {TOKEN}t"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def one(i: int) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(f"{base}/v1/route", headers=headers, params={
                        "call_id": f"f{i}", "service": "999" if i % 3 else "101",
                        "origin": "met", "format": "text"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - started)

        tasks = []
        t0 = time.perf_counter()
        for i in range(rate * seconds):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies, errors


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(p * len(ordered)), len(ordered) - 1)]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "BENCH_TOKEN_T": TOKEN + "t", "BENCH_TOKEN_M": TOKEN + "m",
               "OVERFLOW_LOG_LEVEL": "WARNING"}
        router = subprocess.Popen([sys.executable, "-m", "router", "run", "--config", str(config),
                                   "--port", str(port)], env=env, cwd=tmp)
        try:
            asyncio.run(_prepare(base))
            results: dict[str, object] = {}
            wrk = shutil.which("wrk")
            if wrk:
                script = tmp / "route.lua"
                script.write_text(WRK_SCRIPT)
                out = subprocess.run(
                    [wrk, "-t1", "-c32", f"-d{THROUGHPUT_S}s", "--latency", "-s", str(script),
                     "-H", f"Authorization: Bearer {TOKEN}t", base],
                    capture_output=True, text=True, timeout=THROUGHPUT_S + 30, check=True).stdout
                rps = next(float(line.split()[1]) for line in out.splitlines()
                           if line.startswith("Requests/sec"))
                non2xx = next((int(line.split()[-1]) for line in out.splitlines()
                               if "Non-2xx" in line), 0)
                results["throughput_routes_per_s"] = round(rps)
                results["throughput_non_2xx"] = non2xx
                print(f"throughput (wrk, 1 thread, 32 connections, {THROUGHPUT_S}s): "
                      f"{rps:,.0f} routes/s, non-2xx {non2xx}")
            else:
                print("wrk not installed (Debian package wrk): throughput skipped")
            latencies, errors = asyncio.run(_fixed_rate(base, FIXED_RATE, FIXED_S))
            p50, p99 = _pct(latencies, 0.5) * 1e3, _pct(latencies, 0.99) * 1e3
            results.update(fixed_rate=FIXED_RATE, fixed_p50_ms=round(p50, 2),
                           fixed_p99_ms=round(p99, 2), fixed_errors=errors,
                           fixed_requests=len(latencies))
            print(f"fixed rate {FIXED_RATE}/s for {FIXED_S}s (open loop, aiohttp client): "
                  f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {errors}/{len(latencies)}")
            print(json.dumps(results))
        finally:
            router.send_signal(signal.SIGTERM)
            try:
                router.wait(10)
            except subprocess.TimeoutExpired:
                router.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
