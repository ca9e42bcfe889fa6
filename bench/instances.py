"""Several router instances on one PostgreSQL and one Mosquitto (issue 10).

`python -m bench instances [--leader-rounds N] [--claim-rounds N] [--handoffs N] ...`

Real `python -m router run` processes, each with its own `OVERFLOW_INSTANCE`, config file,
audit log and spool, share one fresh PostgreSQL database (the handoff store, the leader's
lease and the claims) and one private Mosquitto. The destination CAD is a real HTTP server in
a process of its own (`--serve-cad`), answering EIDO over HTTP (the `http_json` adapter); each
instance posts to its own path, so the CAD knows which instance delivered each handoff.

1. Leader takeover: 3 instances; the leader (`GET /readyz` says `leader: true`) is killed
   (SIGKILL: its lease must expire; SIGTERM: it releases the lease at once) and the others
   are polled every 25 ms until one says it leads. The killed one is started again between
   rounds.
2. Claim takeover: handoffs accepted by instance A while the CAD answers 503 (so A keeps them
   claimed, deferred); A gets SIGKILL (its claims must expire) or SIGTERM (it gives them up),
   the CAD starts accepting, and we time from the signal to the CAD holding every handoff;
   the CAD reports who delivered each and every duplicate.
3. Throughput with 1, 2 and 3 instances: the same handoffs POSTed concurrently, round-robin
   over the live instances, to a CAD that acknowledges at once: accepted/s (every answer a
   202), delivered/s (until the CAD has them all) and the routers' CPU per handoff, in ABBA
   order (1, 2, 3, 3, 2, 1). `--router-tree DIR` runs another build on the same harness.

Every process and the database are removed on exit, errors and Ctrl-C included; every wait is
bounded. The machine has 2 cores shared by everything here: more instances cannot be faster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.failover import mosquitto
from bench.handoff import PG_DSN, pg_available, pg_urls

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"BENCH_PARTNER_KENT": "bench-kent-secret", "BENCH_VIEWER": "bench-viewer-secret"}
POLL_S = 0.025  # how often the survivors are asked who leads: far finer than 1 s rounds
READY_WITHIN_S = 30.0
TAKEOVER_WITHIN_S = 30.0
DELIVERY_WITHIN_S = 120.0
HOST_NOTE = ("2 vCPUs shared by the routers, PostgreSQL, Mosquitto, the CAD and the load "
             "generator: more instances cannot show a speed-up here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the destination CAD, in a process of its own ------------------------------------------


class Cad:
    """A CAD endpoint that refuses (503, "unavailable") or acknowledges at once, and counts
    what each instance sent it by idempotency key, so duplicates and losses show."""

    def __init__(self) -> None:
        self.accepting = True
        self.reset()

    def reset(self) -> None:
        self.accepted: dict[str, tuple[str, float]] = {}  # key -> (first deliverer, when)
        self.again: list[dict[str, Any]] = []  # each duplicate: who sent it first and again
        self.refused: dict[str, set[str]] = {}  # instance -> keys it was refused
        self.posts = 0
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    async def incident(self, request: web.Request) -> web.Response:
        await request.read()
        who = request.match_info["instance"]
        key = request.headers.get("Idempotency-Key", "")
        self.posts += 1
        if not self.accepting:
            self.refused.setdefault(who, set()).add(key)
            return web.json_response({"message": "CAD unavailable"}, status=503)
        now = time.time()  # the bench compares it with its own time.time(): same host
        if key in self.accepted:
            self.duplicates += 1
            first, first_at = self.accepted[key]
            if len(self.again) < 100:
                self.again.append({"key": key, "first": first, "first_at": first_at,
                                   "again": who, "at": now})
            return web.json_response({"reference": key, "duplicate": True}, status=200)
        self.accepted[key] = (who, now)
        self.first_at = self.first_at or now
        self.last_at = now
        return web.json_response({"reference": key}, status=201)

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("reset"):
            self.reset()
        if "accept" in body:
            self.accepting = bool(body["accept"])
        return web.json_response({"accepting": self.accepting})

    async def stats(self, request: web.Request) -> web.Response:
        by: dict[str, int] = {}
        for who, _ in self.accepted.values():
            by[who] = by.get(who, 0) + 1
        return web.json_response({
            "accepted": len(self.accepted), "by": by, "posts": self.posts,
            "duplicates": self.duplicates, "again": self.again, "first_at": self.first_at,
            "last_at": self.last_at,
            "refused": {who: len(keys) for who, keys in self.refused.items()}})


def serve_cad(port: int) -> None:
    """Run only the CAD (in its own process: it must not share the load generator's loop)."""
    cad = Cad()
    app = web.Application()
    app.router.add_post("/incidents/{instance}", cad.incident)
    app.router.add_post("/control", cad.control)
    app.router.add_get("/stats", cad.stats)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@dataclass
class CadClient:
    base: str
    session: aiohttp.ClientSession

    async def control(self, **body: Any) -> None:
        async with self.session.post(f"{self.base}/control", json=body) as resp:
            resp.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/stats") as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    async def until(self, accepted: int, within_s: float) -> dict[str, Any]:
        """Poll until the CAD holds `accepted` handoffs; its stats then (or at the deadline)."""
        deadline = time.monotonic() + within_s
        stats = await self.stats()
        while stats["accepted"] < accepted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stats = await self.stats()
        return stats


@contextlib.asynccontextmanager
async def cad_process(workdir: Path) -> AsyncIterator[str]:
    port = free_port()
    with (workdir / "cad.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.instances", "--serve-cad", str(port), cwd=ROOT,
            stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
    try:
        await wait_port(port, 15)
        yield f"http://127.0.0.1:{port}"
    finally:
        await end(proc)


async def wait_port(port: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)


async def end(proc: asyncio.subprocess.Process | None, how: int | None = signal.SIGTERM,
              within_s: float = 10.0) -> None:
    """Stop a child we started: `how` (None: it was already signalled), then SIGKILL if it
    lingers past `within_s`; always reaped."""
    if proc is None or proc.returncode is not None:
        return
    if how is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(how)
    try:
        await asyncio.wait_for(proc.wait(), within_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ---- router instances ------------------------------------------------------------------------


@cache
def _bundled() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    return data


def write_config(workdir: Path, name: str, store: str, mqtt_port: int | None,
                 cad: str) -> Path:
    """The bundled forces without probes or telemetry; the Met's CAD is the bench's, at a
    path naming this instance; the store is the shared PostgreSQL; no escalations in the way."""
    raw = copy.deepcopy(_bundled())
    for force in raw["forces"].values():
        force["centre"]["probes"] = []
        force["centre"]["telemetry"] = False
        force["cad"] = {"adapter": "sim", "options": {"latency_s": 0}}
    raw["forces"]["met"]["cad"] = {"adapter": "http_json",
                                   "options": {"url": f"{cad}/incidents/{name}",
                                               "timeout_s": 2}}
    raw["mqtt"] = {"enabled": mqtt_port is not None, "host": "127.0.0.1",
                   "port": mqtt_port or 1883}
    raw["service"]["tokens"] = [
        # the bench measures capacity, not the partner's rate limit
        {"env": "BENCH_PARTNER_KENT", "role": "partner:kent", "rate_limit": "off"},
        {"env": "BENCH_VIEWER", "role": "viewer"}]
    raw["service"]["audit_log"] = str(workdir / "audit.jsonl")
    raw["handoff"] = {
        "store": store, "spool_dir": str(workdir / "spool"),
        "deadlines_s": {p: 3600 for p in ("P1", "P2", "P3", "P4")},
        "ack_deadlines_s": {"P1": 3600, "P2": 3600},
        "retry": {"attempts": 2, "initial_s": 0.05, "max_s": 0.5, "attempt_timeout_s": 2,
                  "hold_probe_s": 0.5}}
    path = workdir / "forces.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Instance:
    """One `python -m router run` process, started again under the same name after a kill."""

    name: str
    config: Path
    workdir: Path
    # where the router's code runs from: another tree (`--router-tree`, e.g. an older
    # commit's `git archive`) compares builds on the same harness
    tree: Path = ROOT
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, session: aiohttp.ClientSession) -> None:
        with (self.workdir / "router.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", "run", "--config", str(self.config),
                "--host", "127.0.0.1", "--port", str(self.port), cwd=self.tree,
                env={**os.environ, **TOKENS, "OVERFLOW_INSTANCE": self.name},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + READY_WITHIN_S
        while (await self.readiness(session)) is None:
            if self.proc.returncode is not None:
                tail = (self.workdir / "router.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"its log ends:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready within {READY_WITHIN_S:g}s")
            await asyncio.sleep(0.05)

    async def readiness(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """`/readyz` as JSON while ready, else None (starting, not ready or gone)."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{self.url}/readyz",
                                   timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    data: dict[str, Any] = await resp.json()
                    return data
        return None

    async def stop(self, how: int = signal.SIGTERM) -> None:
        await end(self.proc, how)

    def cpu_s(self) -> float:
        """CPU seconds the process has used (Linux /proc): a cost that, unlike a rate, does
        not move much with what else the host is running."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self, how: int) -> None:
        """`how` (SIGKILL or SIGTERM) and nothing else: the caller reaps it (`end`)."""
        assert self.proc is not None
        self.proc.send_signal(how)


@dataclass
class Cluster:
    """The instances sharing one database, broker and CAD, and the bench's HTTP session."""

    instances: list[Instance]
    cad: CadClient
    session: aiohttp.ClientSession
    leases: bool  # whether the routers report a leader (the interface of issue 10)

    async def ensure(self, count: int) -> list[Instance]:
        """Exactly the first `count` instances running (SIGTERM to the others)."""
        for inst in self.instances[count:]:
            if inst.alive:
                await inst.stop()
        for inst in self.instances[:count]:
            if not inst.alive:
                await inst.start(self.session)
        return self.instances[:count]


@contextlib.asynccontextmanager
async def cluster(size: int, tree: Path = ROOT) -> AsyncIterator[Cluster]:
    """`size` instances on a fresh database, a private broker and the CAD; only the first
    is started, to learn whether this build has leases at all."""
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp, \
            mosquitto() as mqtt_port:
        if mqtt_port is None:
            print("mosquitto not installed: routers run without MQTT")
        work = Path(tmp)
        async with pg_urls()() as store, cad_process(work) as cad_url, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(limit=128)) as session:
            instances = []
            for n in range(size):
                name = f"bench-{'abc'[n] if n < 3 else n}"
                (work / name).mkdir()
                config = write_config(work / name, name, store, mqtt_port, cad_url)
                instances.append(Instance(name, config, work / name, tree))
            c = Cluster(instances, CadClient(cad_url, session), session, leases=False)
            try:
                await instances[0].start(session)
                c.leases = "leader" in (await instances[0].readiness(session) or {})
                yield c
            finally:
                for inst in instances:
                    with contextlib.suppress(Exception):
                        await inst.stop()


# ---- handoffs --------------------------------------------------------------------------------

OPENED_AT = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def incident(run: str, n: int) -> dict[str, Any]:
    return {"incident_id": f"{run}-{n:06d}", "from": "kent", "to": "met", "priority": "P1",
            "service": "999", "opened_at": OPENED_AT,
            "location": {"lat": 51.27, "lon": 0.52}, "category": "burglary",
            "summary": f"bench incident {n}"}


async def post_all(session: aiohttp.ClientSession, targets: Sequence[Instance], count: int,
                   concurrency: int) -> tuple[float, dict[int, int]]:
    """POST `count` new handoffs, the i-th to targets[i % len]; (seconds, answers by status)."""
    run = uuid.uuid4().hex[:8]
    todo = iter(range(count))
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {TOKENS['BENCH_PARTNER_KENT']}"}

    async def client() -> None:
        for n in todo:
            url = f"{targets[n % len(targets)].url}/v1/handoffs"
            try:
                async with session.post(url, json=incident(run, n), headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0  # no answer
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(client())
    return time.perf_counter() - t0, statuses


# ---- 1. leader takeover ----------------------------------------------------------------------


async def leaders(c: Cluster, among: Sequence[Instance]) -> list[Instance]:
    answers = await asyncio.gather(*(i.readiness(c.session) for i in among))
    return [i for i, a in zip(among, answers, strict=True) if a and a.get("leader") is True]


async def one_leader(c: Cluster, within_s: float) -> Instance:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = await leaders(c, [i for i in c.instances if i.alive])
        if len(found) == 1:
            return found[0]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no single leader among the instances within {within_s:g}s")


async def bench_leader(c: Cluster, rounds: int, how: int) -> dict[str, Any]:
    """Kill the leader with `how`; seconds until a survivor says it leads, per round."""
    times: list[float] = []
    double = 0  # polls on which two survivors both said they lead
    failed = 0
    await c.ensure(len(c.instances))
    for _ in range(rounds):
        leader = await one_leader(c, 15)
        others = [i for i in c.instances if i is not leader]
        t0 = time.monotonic()
        leader.kill(how)
        took = None
        while time.monotonic() - t0 < TAKEOVER_WITHIN_S:
            found = await leaders(c, others)
            double += len(found) > 1
            if found:
                took = time.monotonic() - t0
                break
            await asyncio.sleep(POLL_S)
        await end(leader.proc, None, 15)
        if took is None:
            failed += 1
        else:
            times.append(took)
        await leader.start(c.session)
    return {"signal": signal.Signals(how).name, "rounds": rounds, "times": times,
            "failed": failed, "double": double}


# ---- 2. claim takeover -----------------------------------------------------------------------


async def bench_claims(c: Cluster, rounds: int, count: int, how: int) -> dict[str, Any]:
    """Handoffs held (CAD 503) by A; A gets `how`, the CAD accepts: seconds from the signal
    until the CAD has every one (SIGKILL: A's claims must expire; SIGTERM: A gives them up)."""
    out: dict[str, Any] = {"signal": signal.Signals(how).name, "rounds": rounds,
                           "count": count, "times": [], "failed": 0, "by": {},
                           "duplicates": 0, "again": [], "early": 0, "lost": 0}
    await c.ensure(len(c.instances))
    a = c.instances[0]
    for _ in range(rounds):
        await c.cad.control(reset=True, accept=False)
        _, statuses = await post_all(c.session, [a], count, 16)
        if statuses != {202: count}:
            raise RuntimeError(f"claims: POSTs to {a.name} answered {statuses}")
        deadline = time.monotonic() + 15  # until A has tried (and been refused) every one
        while (await c.cad.stats())["refused"].get(a.name, 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{a.name} did not try every handoff within 15 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # claims renewed at least once: A plainly holds them
        before = await c.cad.stats()
        out["early"] += sum(n for who, n in before["refused"].items() if who != a.name)
        t0 = time.time()
        a.kill(how)
        await c.cad.control(accept=True)
        stats = await c.cad.until(count, DELIVERY_WITHIN_S)
        if stats["accepted"] >= count and stats["last_at"] is not None:
            out["times"].append(stats["last_at"] - t0)
        else:
            out["failed"] += 1
            out["lost"] += count - stats["accepted"]
        for who, n in stats["by"].items():
            out["by"][who] = out["by"].get(who, 0) + n
        out["duplicates"] += stats["duplicates"]
        out["again"] += stats["again"]
        await end(a.proc, None, 15)
        await a.start(c.session)
    await c.cad.control(accept=True)
    return out


# ---- 3. throughput with 1, 2 and 3 instances -------------------------------------------------


async def bench_throughput(c: Cluster, count: int, concurrency: int,
                           order: Sequence[int]) -> list[dict[str, Any]]:
    results = []
    await c.cad.control(reset=True, accept=True)
    for k in order:
        live = await c.ensure(k)
        await asyncio.sleep(1.0)  # let a freshly started instance settle (leases, claims)
        await c.cad.control(reset=True)
        cpu0 = sum(i.cpu_s() for i in live)
        t0 = time.time()
        elapsed, statuses = await post_all(c.session, live, count, concurrency)
        stats = await c.cad.until(count, DELIVERY_WITHIN_S)
        cpu_ms = 1000 * (sum(i.cpu_s() for i in live) - cpu0) / count
        done = stats["last_at"] - t0 if stats["accepted"] >= count else None
        results.append({"instances": k, "accepted_per_s": count / elapsed,
                        "statuses": statuses, "delivered": stats["accepted"],
                        "delivered_per_s": count / done if done else None,
                        "duplicates": stats["duplicates"], "by": stats["by"],
                        "cpu_ms": cpu_ms})
        print(f"  {k} instance(s): accepted {count / elapsed:,.0f}/s, delivered "
              f"{stats['accepted']}/{count}"
              + (f" at {count / done:,.0f}/s" if done else " (not all)")
              + f", routers' CPU {cpu_ms:.2f} ms a handoff", flush=True)
    return results


# ---- report ----------------------------------------------------------------------------------


def _p(times: list[float]) -> str:
    if not times:
        return "—"
    return (f"{statistics.median(times):.2f} s / {max(times):.2f} s "
            f"({', '.join(f'{t:.2f}' for t in times)})")


def _again(again: list[dict[str, Any]]) -> str:
    """Who sent each duplicate first and again, and how much later."""
    if not again:
        return ""
    pairs: dict[str, int] = {}
    for d in again:
        pair = f"{d['first']} then {d['again']}"
        pairs[pair] = pairs.get(pair, 0) + 1
    gaps = [d["at"] - d["first_at"] for d in again]
    return (f" ({', '.join(f'{p} {n}' for p, n in sorted(pairs.items()))}; "
            f"sent again {min(gaps):.2f}-{max(gaps):.2f} s after the first)")


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value else "—"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value and base else "—"


def report(leader: list[dict[str, Any]], claim_runs: list[dict[str, Any]],
           rates: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    if leader or claim_runs:
        lines += ["| takeover | rounds | p50 / max (each round) | notes |", "|---|---|---|---|"]
    for r in leader:
        note = []
        if r["failed"]:
            note.append(f"{r['failed']} rounds with no new leader within "
                        f"{TAKEOVER_WITHIN_S:g} s")
        if r["double"]:
            note.append(f"two leaders seen on {r['double']} polls")
        lines.append(f"| leader, {r['signal']} of the leader | {r['rounds']} | "
                     f"{_p(r['times'])} | {'; '.join(note) or 'one leader at every poll'} |")
    for claims in claim_runs:
        note = [f"delivered by {', '.join(f'{k} {v}' for k, v in sorted(claims['by'].items()))}",
                f"{claims['duplicates']} duplicates at the CAD{_again(claims['again'])}"]
        if claims["early"]:
            note.append(f"{claims['early']} attempts by other instances before the signal")
        if claims["failed"]:
            note.append(f"{claims['failed']} rounds incomplete after {DELIVERY_WITHIN_S:g} s "
                        f"({claims['lost']} handoffs missing)")
        lines.append(f"| claims: {claims['count']} held handoffs, {claims['signal']} of "
                     "their holder "
                     f"until the CAD has all | {claims['rounds']} | {_p(claims['times'])} | "
                     f"{'; '.join(note)} |")
    if not rates:
        return "\n".join(lines)
    lines += [*([""] if lines else []),
              f"{args.handoffs:,} handoffs a round, {args.concurrency} at once, "
              "round-robin over the live instances; rounds in the order "
              + ", ".join(str(r["instances"]) for r in rates) + ":", "",
              "| instances | accepted/s (rounds) | delivered/s (rounds) | accepted / 1 | "
              "delivered / 1 | routers' CPU per handoff | answers | at the CAD |",
              "|---|---|---|---|---|---|---|---|"]
    by_k: dict[int, list[dict[str, Any]]] = {}
    for r in rates:
        by_k.setdefault(r["instances"], []).append(r)

    def mean(k: int, key: str) -> float | None:
        got = [r[key] for r in by_k[k] if r[key]]
        return statistics.fmean(got) if len(got) == len(by_k[k]) else None

    base_acc = mean(1, "accepted_per_s") if 1 in by_k else None
    base_del = mean(1, "delivered_per_s") if 1 in by_k else None
    for k in sorted(by_k):
        acc, dlv = mean(k, "accepted_per_s"), mean(k, "delivered_per_s")
        answers: dict[int, int] = {}
        for r in by_k[k]:
            for status, n in r["statuses"].items():
                answers[status] = answers.get(status, 0) + n
        delivered = sum(r["delivered"] for r in by_k[k])
        dupes = sum(r["duplicates"] for r in by_k[k])
        by: dict[str, int] = {}
        for r in by_k[k]:
            for who, n in r["by"].items():
                by[who] = by.get(who, 0) + n
        who_did = ", ".join(f"{who} {n:,}" for who, n in sorted(by.items()))
        acc_rounds = ", ".join(_rate(r["accepted_per_s"]) for r in by_k[k])
        del_rounds = ", ".join(_rate(r["delivered_per_s"]) for r in by_k[k])
        said = ", ".join(f"{n} x {s or 'no answer'}" for s, n in sorted(answers.items()))
        lines.append(
            f"| {k} | {_rate(acc)} ({acc_rounds}) | {_rate(dlv)} ({del_rounds}) | "
            f"{_ratio(acc, base_acc)} | {_ratio(dlv, base_del)} | "
            f"{statistics.fmean(r['cpu_ms'] for r in by_k[k]):.2f} ms | {said} | "
            f"{delivered:,}/{args.handoffs * len(by_k[k]):,}, {dupes} duplicates "
            f"(by {who_did}) |")
    lines += ["", f"Note: {HOST_NOTE}. What the ratios show is the cost of sharing the work "
              "(claims, leases) and that nothing is lost, not scaling."]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM to the bench: clean up like Ctrl-C
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    load_at_start = os.getloadavg()[0]
    if not await pg_available():  # `make bench` goes on with the other benches
        return f"PostgreSQL at {PG_DSN} is not reachable: bench instances skipped"
    leader: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    async with cluster(3, args.router_tree.resolve()) as c:
        if not c.leases:
            print("the routers report no leader (/readyz has no `leader`): issue 10's "
                  "leases are not in this build; leader and claim takeover skipped")
        if c.leases and args.leader_rounds:
            for how in (signal.SIGKILL, signal.SIGTERM):
                print(f"[leader] {signal.Signals(how).name} x {args.leader_rounds} ...",
                      flush=True)
                leader.append(await bench_leader(c, args.leader_rounds, how))
        if c.leases and args.claim_rounds:
            for how in (signal.SIGKILL, signal.SIGTERM):
                print(f"[claims] {signal.Signals(how).name} x {args.claim_rounds}, "
                      f"{args.claim_handoffs} handoffs each ...", flush=True)
                claims.append(await bench_claims(c, args.claim_rounds, args.claim_handoffs,
                                                 how))
        if args.handoffs:
            order = [int(k) for k in args.order.split(",")]
            print(f"[throughput] {args.handoffs:,} handoffs a round, instances {order} ...",
                  flush=True)
            rates = await bench_throughput(c, args.handoffs, args.concurrency, order)
    return (report(leader, claims, rates, args) + f"\n\nHost load average (1 min): "
            f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"({os.cpu_count()} CPUs).")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench instances")
    parser.add_argument("--leader-rounds", type=int, default=5)
    parser.add_argument("--claim-rounds", type=int, default=3)
    parser.add_argument("--claim-handoffs", type=int, default=50)
    parser.add_argument("--handoffs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--order", default="1,2,3,3,2,1")
    parser.add_argument("--router-tree", type=Path, default=ROOT,
                        help="run the routers from this source tree (compare builds)")
    parser.add_argument("--serve-cad", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_cad:
        serve_cad(args.serve_cad)
        return 0
    if not (args.router_tree / "router").is_dir():
        parser.error(f"--router-tree {args.router_tree}: no router package there")
    try:
        print(asyncio.run(run(args)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the routers, CAD, broker and database it started are gone")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
