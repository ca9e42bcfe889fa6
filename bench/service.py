"""`/v1/route` over real HTTP on loopback: throughput, and latency at a fixed 1,000 routes/s.

The router runs as its own process (`overflow-router run`); load comes from another process
(wrk for throughput when installed, an open-loop aiohttp client for the fixed rate), so the
router's one event loop is measured, not the load generator's. The Met is declared down first so
most decisions take the overflow path, not the cheap home path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
THROUGHPUT_S = 10
FIXED_RATE = 1000
FIXED_S = 10
PACED_ROUNDS = 3  # router and floor alternate, so drift on a shared machine hits both

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


PACED_SCRIPT = WRK_SCRIPT + """
-- pace each connection so that all of them together offer the target rate
delay = function()
  return DELAY_MS
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
    raw["service"]["max_call_duration_s"] = 30  # calls are never ended here: expiry bounds them
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


def _wrk(wrk: str, tmp: Path, base: str, script: str, *, connections: int,
         seconds: int) -> dict[str, float]:
    path = tmp / "route.lua"
    path.write_text(script)
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(path),
         "-H", f"Authorization: Bearer {TOKEN}t", base],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    lines = [line.split() for line in out.splitlines()]

    def latency_ms(label: str) -> float:
        value = next(parts[1] for parts in lines if parts[:1] == [label])
        for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
            if value.endswith(unit):
                return round(float(value[: -len(unit)]) * scale, 3)
        raise ValueError(value)

    return {
        "rps": next(float(p[1]) for p in lines if p[:1] == ["Requests/sec:"]),
        "non_2xx": next((float(p[-1]) for p in lines if p[:2] == ["Non-2xx", "or"]), 0.0),
        "p50_ms": latency_ms("50%"),
        "p99_ms": latency_ms("99%"),
    }


def _median(outs: list[dict[str, float]], key: str) -> float:
    return statistics.median(o[key] for o in outs)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(p * len(ordered)), len(ordered) - 1)]


@contextlib.contextmanager
def _router(tmp: Path) -> Iterator[str]:
    """A fresh router process per phase, so one phase's calls never weigh on the next."""
    config = _config(tmp)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BENCH_TOKEN_T": TOKEN + "t", "BENCH_TOKEN_M": TOKEN + "m",
           "OVERFLOW_LOG_LEVEL": "ERROR"}
    router = subprocess.Popen([sys.executable, "-m", "router", "run", "--config", str(config),
                               "--port", str(port)], env=env, cwd=tmp)
    try:
        asyncio.run(_prepare(base))
        yield base
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()


HELLO = """
import sys
from aiohttp import web
async def route(request):
    return web.Response(text="sip:999@cc.kent.police.example")
app = web.Application()
app.router.add_get("/v1/route", route)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


@contextlib.contextmanager
def _hello() -> Iterator[str]:
    """The floor: a bare aiohttp handler that returns a fixed URI, same machine, same load."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", HELLO, str(port)])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str]) -> int:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        wrk = shutil.which("wrk")
        if wrk:
            with _router(tmp) as base:
                out = _wrk(wrk, tmp, base, WRK_SCRIPT, connections=32, seconds=THROUGHPUT_S)
            results["throughput_routes_per_s"] = round(out["rps"])
            results["throughput_non_2xx"] = out["non_2xx"]
            print(f"throughput (wrk, 1 thread, 32 connections, {THROUGHPUT_S}s): "
                  f"{out['rps']:,.0f} routes/s, non-2xx {out['non_2xx']:.0f}")
            # 20 connections, each pausing 20 ms between requests: about 1,000 routes/s
            paced = PACED_SCRIPT.replace("DELAY_MS", "20")
            runs: dict[str, list[dict[str, float]]] = {"paced": [], "paced_bare": []}
            for _ in range(PACED_ROUNDS):
                for key, server in (("paced", _router(tmp)), ("paced_bare", _hello())):
                    with server as base:
                        out = _wrk(wrk, tmp, base, paced, connections=20, seconds=FIXED_S)
                    runs[key].append(out)
                    print(f"paced, {'router' if key == 'paced' else 'bare aiohttp'} (wrk, 20 "
                          f"connections x 20 ms pauses, {FIXED_S}s): {out['rps']:,.0f} "
                          f"requests/s, p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, "
                          f"non-2xx {out['non_2xx']:.0f}")
            for key, outs in runs.items():
                results.update({f"{key}_routes_per_s": round(_median(outs, "rps")),
                                f"{key}_p50_ms": _median(outs, "p50_ms"),
                                f"{key}_p99_ms": _median(outs, "p99_ms"),
                                f"{key}_p99_ms_worst": max(o["p99_ms"] for o in outs),
                                f"{key}_non_2xx": sum(o["non_2xx"] for o in outs)})
            ratio = _median(runs["paced"], "p99_ms") / _median(runs["paced_bare"], "p99_ms")
            results["paced_p99_ratio_router_to_bare"] = round(ratio, 2)
            print(f"median of {PACED_ROUNDS} rounds: router p99 {results['paced_p99_ms']} ms, "
                  f"bare {results['paced_bare_p99_ms']} ms, router / bare {ratio:.2f}")
        else:
            print("wrk not installed (Debian package wrk): throughput and paced runs skipped")
        with _router(tmp) as base:
            latencies, errors = asyncio.run(_fixed_rate(base, FIXED_RATE, FIXED_S))
        p50, p99 = _pct(latencies, 0.5) * 1e3, _pct(latencies, 0.99) * 1e3
        results.update(open_loop_rate=FIXED_RATE, open_loop_p50_ms=round(p50, 2),
                       open_loop_p99_ms=round(p99, 2), open_loop_errors=errors)
        print(f"open loop {FIXED_RATE}/s for {FIXED_S}s (Python aiohttp client, includes "
              f"the client's own scheduling delays): p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
              f"errors {errors}/{len(latencies)}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
