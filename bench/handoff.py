"""Incident handoffs: durable acceptance rate, delivery latency, backlog drain; SQLite and
PostgreSQL.

- accept: handoffs/s through `HandoffDesk.submit` (each one committed before it returns) with
  64 concurrent submitters, with group commit and, side by side, with it turned off (one
  transaction and fsync per handoff); and through `POST /v1/handoffs` over loopback HTTP.
- latency: from acceptance to the destination CAD's acknowledgement, at a steady 100
  handoffs/s, to a healthy CAD answering EIDO over HTTP (http_json adapter) on loopback.
- drain: 10,000 handoffs held while the CAD is down, then the CAD comes back: handoffs/s
  until the backlog is empty, with the default `max_concurrency` of 8 and, side by side, 32.

The desk and its store run in this process; the CAD endpoint runs in a process of its own so
it does not share the desk's event loop (the HTTP acceptance clients do share it). On a
2-core machine shared with other work: treat figures as noisy lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from router.config import RouterConfig, Token
from router.handoff.cads import build_adapters
from router.handoff.desk import HandoffDesk
from router.handoff.incident import Incident
from router.handoff.store import MAX_BATCH, HandoffStore, open_store
from router.http import handoffs as api_handoffs
from router.http.auth import TOKENS, TokenBook
from router.http.errors import errors_middleware

PG_DSN = os.environ.get("OVERFLOW_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"accept": 2000.0, "p99_ms": 200.0, "drain": 1000.0}


def _incident(n: int, run: str, frm: str = "kent", priority: str = "P1") -> dict[str, Any]:
    return {"incident_id": f"{run}-{n}", "from": frm, "to": "met", "priority": priority,
            "service": "999", "opened_at": "2025-03-25T21:40:00+00:00",
            "location": {"lat": 51.5, "lon": -0.12}, "category": "burglary",
            "summary": f"bench incident {n}"}


def _config(tmp: Path, store: str, cad_url: str, max_concurrency: int = 8) -> RouterConfig:
    import yaml

    raw = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    for force in raw["forces"].values():
        force["centre"]["probes"] = []
        force["cad"] = {"adapter": "sim", "options": {"latency_s": 0}}
    raw["forces"]["met"]["cad"] = {"adapter": "http_json",
                                   "options": {"url": cad_url, "timeout_s": 5}}
    raw["mqtt"] = {"enabled": False}
    raw["handoff"].update(store=store, spool_dir=str(tmp / "spool"),
                          max_concurrency=max_concurrency,
                          deadlines_s={"P1": 3600, "P2": 3600, "P3": 3600, "P4": 3600})
    return RouterConfig.model_validate(raw)


class Cad:
    """A healthy CAD endpoint: acknowledges each EIDO at once."""

    def __init__(self) -> None:
        self.received = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        return web.json_response({"reference": str(self.received)}, status=201)


def serve_cad(port: int) -> None:
    """Run only the CAD endpoint (in its own process, so it does not share our loop)."""
    app = web.Application()
    app.router.add_post("/incidents", Cad().handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@contextlib.asynccontextmanager
async def cad_process() -> AsyncIterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.handoff", "--serve-cad", str(port), cwd=ROOT)
    try:
        async with asyncio.timeout(15):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/incidents"
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Gate:
    """The watcher's word on each CAD, which the bench flips."""

    up: bool = True

    def __call__(self, force: str) -> bool:
        return self.up or force != "met"


@contextlib.asynccontextmanager
async def desk_on(config: RouterConfig, gate: Gate,
                  max_batch: int = MAX_BATCH) -> AsyncIterator[tuple[HandoffDesk, HandoffStore]]:
    built = build_adapters(config)
    async with open_store(config.handoff.store, max_batch) as store:
        desk = HandoffDesk(config.handoff, store, built, alert=lambda a: None, cad_up=gate)
        await desk.resume()
        runner = asyncio.create_task(desk.run())
        try:
            yield desk, store
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            for adapter in built.values():
                await adapter.aclose()


async def _submit_all(desk: HandoffDesk, incidents: list[Incident], concurrency: int) -> float:
    queue = iter(incidents)

    async def submitter() -> None:
        for inc in queue:
            await desk.submit(inc)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(submitter())
    return time.perf_counter() - t0


async def bench_accept(store_url: Callable[[], Any], tmp: Path, cad_url: str, n: int,
                       n_single: int) -> dict[str, float]:
    gate = Gate(up=False)  # nothing delivered meanwhile: acceptance alone is measured
    out = {}
    for label, batch, count in (("grouped", MAX_BATCH, n), ("single", 1, n_single)):
        async with store_url() as url:
            run = uuid.uuid4().hex[:6]
            incidents = [Incident.model_validate(_incident(i, run)) for i in range(count)]
            async with desk_on(_config(tmp, url, cad_url), gate, batch) as (desk, store):
                elapsed = await _submit_all(desk, incidents, 64)
                out[f"{label}_per_s"] = count / elapsed
                out[f"{label}_rows_per_commit"] = store.rows / max(store.commits, 1)
    out["ratio"] = out["grouped_per_s"] / out["single_per_s"]
    return out


async def bench_accept_http(store_url: Callable[[], Any], tmp: Path, cad_url: str,
                            n: int) -> float:
    async with store_url() as url:
        config = _config(tmp, url, cad_url)
        async with desk_on(config, Gate(up=False)) as (desk, _):
            app = web.Application(middlewares=[errors_middleware])
            app[TOKENS] = TokenBook((Token(env="BENCH_KENT", role="partner:kent"),),
                                    {"BENCH_KENT": "kent"})
            app[api_handoffs.HANDOFFS] = api_handoffs.OpenDesk(desk)
            api_handoffs.add_routes(app)
            run = uuid.uuid4().hex[:6]
            bodies = iter([_incident(i, run) for i in range(n)])
            async with serving(app) as base, aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=64),
                    timeout=aiohttp.ClientTimeout(total=30)) as session:

                async def client() -> None:
                    for body in bodies:
                        async with session.post(base + "/v1/handoffs", json=body,
                                                headers={"Authorization": "Bearer kent"}) as r:
                            assert r.status == 202, await r.text()

                t0 = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    for _ in range(64):
                        tg.create_task(client())
                return n / (time.perf_counter() - t0)


async def bench_latency(store_url: Callable[[], Any], tmp: Path, cad_url: str, n: int,
                        rate: float) -> dict[str, float]:
    async with store_url() as url:
        run = uuid.uuid4().hex[:6]
        async with desk_on(_config(tmp, url, cad_url), Gate(up=True)) as (desk, store):
            t0 = time.perf_counter()
            for i in range(n):
                await desk.submit(Incident.model_validate(_incident(i, run)))
                pause = t0 + (i + 1) / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
            async with asyncio.timeout(60):
                await desk.drained("met")
            rows = await store.query(status="delivered", to="met", limit=n)
    lat = sorted((h.delivered_at or 0) - h.accepted_at for h in rows)
    return {"n": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1000 * lat[-1]}


async def bench_drain(store_url: Callable[[], Any], tmp: Path, cad_url: str,
                      n: int, concurrency: int) -> dict[str, float]:
    async with store_url() as url:
        run = uuid.uuid4().hex[:6]
        gate = Gate(up=False)
        priorities = ("P1", "P2", "P3", "P4")
        incidents = [Incident.model_validate(_incident(i, run, priority=priorities[i % 4]))
                     for i in range(n)]
        async with desk_on(_config(tmp, url, cad_url, concurrency), gate) as (desk, _):
            accept_s = await _submit_all(desk, incidents, 64)
            gate.up = True
            t0 = time.perf_counter()
            desk.cad_state_changed("met", True)
            async with asyncio.timeout(300):
                await desk.drained("met")
            drain_s = time.perf_counter() - t0
    return {"backlog_accept_per_s": n / accept_s, "drain_per_s": n / drain_s,
            "drain_s": drain_s}


def sqlite_urls(tmp: Path) -> Callable[[], Any]:
    @contextlib.asynccontextmanager
    async def fresh() -> AsyncIterator[str]:
        yield f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.db'}"

    return fresh


def pg_urls() -> Callable[[], Any]:
    base, _, _ = PG_DSN.rpartition("/")

    @contextlib.asynccontextmanager
    async def fresh() -> AsyncIterator[str]:
        name = f"overflow_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        try:
            yield f"{base}/{name}"
        finally:
            admin = await asyncpg.connect(PG_DSN, timeout=5)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()

    return fresh


async def pg_available() -> bool:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        async with cad_process() as cad_url:
            backends: list[tuple[str, Callable[[], Any]]] = [("sqlite", sqlite_urls(tmp))]
            if "postgresql" in args.backends:
                if await pg_available():
                    backends.append(("postgresql", pg_urls()))
                else:
                    print(f"PostgreSQL at {PG_DSN} not reachable: skipped")
            for name, urls in backends:
                if name not in args.backends:
                    continue
                print(f"[{name}] accept ...", flush=True)
                accept = await bench_accept(urls, tmp, cad_url, args.accept, args.accept_single)
                http = await bench_accept_http(urls, tmp, cad_url, args.accept_http)
                print(f"[{name}] latency ...", flush=True)
                latency = await bench_latency(urls, tmp, cad_url, args.latency, args.rate)
                print(f"[{name}] drain ...", flush=True)
                drain = await bench_drain(urls, tmp, cad_url, args.drain, 8)
                wide = await bench_drain(urls, tmp, cad_url, args.drain, 32)
                results.append({"backend": name, **accept, "http_per_s": http, **latency,
                                **drain, "drain32_per_s": wide["drain_per_s"]})
    return results


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| store | accepted/s (desk, 64 submitters) | same, one commit per handoff | "
        "group-commit gain | rows per commit | accepted/s over HTTP | delivery p50 | "
        "delivery p99 | drain of " + f"{args.drain:,} held" + " | same, max_concurrency 32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['grouped_per_s']:,.0f} | {r['single_per_s']:,.0f} | "
            f"{r['ratio']:.1f}x | {r['grouped_rows_per_commit']:.1f} | {r['http_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['drain_per_s']:,.0f}/s "
            f"({r['drain_s']:.1f} s) | {r['drain32_per_s']:,.0f}/s |")
    lines.append("")
    for r in results:
        verdict = [
            f"accept {'met' if r['grouped_per_s'] >= TARGETS['accept'] else 'MISSED'} "
            f"(target {TARGETS['accept']:,.0f}/s)",
            f"p99 {'met' if r['p99_ms'] <= TARGETS['p99_ms'] else 'MISSED'} "
            f"(target {TARGETS['p99_ms']:.0f} ms)",
            f"drain {'met' if r['drain_per_s'] >= TARGETS['drain'] else 'MISSED'} "
            f"(target {TARGETS['drain']:,.0f}/s)",
        ]
        lines.append(f"- {r['backend']}: " + "; ".join(verdict))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench handoff")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--accept", type=int, default=10_000)
    parser.add_argument("--accept-single", type=int, default=1_000)
    parser.add_argument("--accept-http", type=int, default=5_000)
    parser.add_argument("--latency", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--drain", type=int, default=10_000)
    parser.add_argument("--serve-cad", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_cad:
        serve_cad(args.serve_cad)
        return 0
    args.backends = args.backends.split(",")
    results = asyncio.run(run(args))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
