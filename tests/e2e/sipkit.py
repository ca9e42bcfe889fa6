"""A real SIP edge on loopback for tests and benchmarks: Kamailio (deploy/kamailio), the router
as its own process, sipp centres answering calls, and a sipp stage-1 caller whose log says which
centre answered each call.

Every process is started on free ports and stopped by `stop()`, even on failure; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml
from aiohttp import web

from router.watch.probes import probe_sip

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
SIPP = shutil.which("sipp")
HTTP_MODULE = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/http_client.so")
PACKAGES = "Debian's kamailio, kamailio-utils-modules and sip-tester packages"
TELEPHONY_ENV, VIEWER_ENV = "E2E_TOKEN_TELEPHONY", "E2E_TOKEN_VIEWER"
TOKENS = {TELEPHONY_ENV: "e2e-telephony-token", VIEWER_ENV: "e2e-viewer-token"}


def tools_present() -> bool:
    return Path(KAMAILIO).exists() and SIPP is not None and HTTP_MODULE.exists()


def udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stop(proc: asyncio.subprocess.Process | None, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it lingers. Kamailio forks workers into its own process group."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def spawn(*argv: str, log: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> asyncio.subprocess.Process:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True)


async def wait_sip(port: int, timeout_s: float = 10.0) -> None:
    """Until something on 127.0.0.1:port answers SIP OPTIONS."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await probe_sip(f"127.0.0.1:{port}", 0.2)).ok:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no SIP answer on 127.0.0.1:{port} after {timeout_s}s")


# ---- a force's centre: a sipp answering machine and a CAD health URL ------------------------


async def _healthy(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@dataclass
class Centre:
    """Stands in for one force's control room; `fail()` takes both halves away."""

    force: str
    sip_port: int
    health_port: int
    workdir: Path
    uas: asyncio.subprocess.Process | None = None
    health: web.AppRunner | None = None

    async def start(self, refuse_calls_with: int | None = None) -> None:
        """Answer calls, or (a grey failure) refuse each with `refuse_calls_with` while still
        answering OPTIONS."""
        scenario = HERE / "uas.xml"
        if refuse_calls_with is not None:
            scenario = self.workdir / f"uas-{self.force}-{refuse_calls_with}.xml"
            scenario.write_text((HERE / "uas_fail.xml").read_text().replace(
                "CODE", str(refuse_calls_with)))
        self.uas = await spawn(
            SIPP or "sipp", "-sf", str(scenario), "-i", "127.0.0.1",
            "-p", str(self.sip_port), "-key", "centre", self.force, "-nostdin",
            "-trace_err", "-error_file", str(self.workdir / f"uas-{self.force}.err"),
            log=self.workdir / f"uas-{self.force}.out", cwd=self.workdir)
        if self.health is None:
            app = web.Application()
            app.router.add_get("/health", _healthy)
            self.health = web.AppRunner(app)
            await self.health.setup()
            await web.TCPSite(self.health, "127.0.0.1", self.health_port).start()
        await wait_sip(self.sip_port)

    async def refuse_calls(self, code: int) -> None:
        """Swap the answering UAS for one that refuses calls with `code`; CAD stays up."""
        await stop(self.uas)
        await self.start(refuse_calls_with=code)

    async def fail(self) -> None:
        await stop(self.uas)
        self.uas = None
        if self.health is not None:
            await self.health.cleanup()
            self.health = None


def write_forces(path: Path, centres: dict[str, Centre], partners: dict[str, list[str]],
                 workdir: Path) -> Path:
    """A forces.yaml for these centres: fast health checks, quick recovery, all on loopback."""
    forces: dict[str, Any] = {}
    for fid, c in centres.items():
        uri = f"sip:{{}}@127.0.0.1:{c.sip_port}"
        forces[fid] = {
            "name": fid.title(),
            "centre": {
                "handlers_on_duty": 30, "overflow_queue": 10, "max_queue": 20,
                "telemetry": False,
                "probes": [
                    {"kind": "sip", "target": f"127.0.0.1:{c.sip_port}",
                     "component": "telephony"},
                    {"kind": "http", "target": f"http://127.0.0.1:{c.health_port}/health",
                     "component": "cad"},
                ],
                "on_cad_down": "overflow",
                "shed_101": {"queue": uri.format("101-queue"),
                             "announcement": uri.format("101-unavailable")},
            },
            "sip": {"999": uri.format("999"), "101": uri.format("101")},
            "cad": {"adapter": "sim"},
            "mutual_aid": {"max_concurrent": 200, "only_while_queue_below": 20},
            "overflow": {
                service: [{"to": p, "weight": len(partners.get(fid, [])) - i}
                          for i, p in enumerate(partners.get(fid, []))]
                for service in ("999", "101")
            },
        }
    doc = {
        "version": 1,
        "service": {"tokens": [{"env": TELEPHONY_ENV, "role": "telephony"},
                               {"env": VIEWER_ENV, "role": "viewer"}],
                    "audit_log": str(workdir / "audit.jsonl")},
        "mqtt": {"enabled": False},
        "health": {"interval_s": 0.2, "timeout_s": 0.15, "jitter": 0.1,
                   "unhealthy_threshold": 2, "healthy_threshold": 2,
                   "recovery": {"ramp": [0.5, 1.0], "step_s": 1},
                   "flap_damping": {"window_s": 5, "max_transitions": 10, "hold_s": 1}},
        "handoff": {"store": f"sqlite:///{workdir / 'handoffs.db'}",
                    "spool_dir": str(workdir / "spool")},
        "forces": forces,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


# ---- the router and the proxy ---------------------------------------------------------------


@dataclass
class Router:
    """`python -m router run` as its own process. `name` names its log (`NAME.log` in
    `workdir`); `env` is added to the tokens' environment (e.g. `OVERFLOW_INSTANCE`, more
    tokens)."""

    config: Path
    port: int
    workdir: Path
    proc: asyncio.subprocess.Process | None = None
    name: str = "router"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await spawn(sys.executable, "-m", "router", "run", "--config",
                                str(self.config), "--host", "127.0.0.1", "--port", str(self.port),
                                log=self.workdir / f"{self.name}.log", env=TOKENS | self.env,
                                cwd=ROOT)
        await self.wait_states(lambda states: True, timeout_s=15)

    async def kill(self) -> None:
        """SIGKILL: no shutdown at all, as a crashed host or the OOM killer leaves it."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None

    async def readyz(self, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """`/readyz`'s JSON (200 or 503), or None when the router does not answer."""
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as http, \
                    http.get(f"{self.url}/readyz") as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    async def states(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {TOKENS[VIEWER_ENV]}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http, \
                http.get(f"{self.url}/v1/forces", headers=headers) as response:
            response.raise_for_status()
            body = await response.json()
        forces = body.get("forces", body)
        return {fid: str(view.get("state", "unknown")) for fid, view in forces.items()}

    async def wait_states(self, ok: Any, timeout_s: float = 10.0) -> dict[str, str]:
        """Until `ok(states)` holds; the router may still be starting."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, str] | str = "no answer"
        while time.monotonic() < deadline:
            try:
                states = await self.states()
                if ok(states):
                    return states
                last = states
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"router states not as wanted after {timeout_s}s: {last}")

    async def stop(self) -> None:
        await stop(self.proc)
        self.proc = None


@dataclass
class Proxy:
    """Kamailio with deploy/kamailio/kamailio.cfg, rendered from the router's forces.yaml."""

    forces: Path
    port: int
    workdir: Path
    router_url: str | None  # None: the static baseline, every call home
    children: int = 4
    route_workers: int = 8
    breaker_s: int = 5
    more_routers: Sequence[str] = ()  # asked in order after router_url
    plan_max_age_s: int = 300
    keepalive: bool = True
    proc: asyncio.subprocess.Process | None = None

    @property
    def routers(self) -> list[str]:
        return [self.router_url, *self.more_routers] if self.router_url else []

    def env(self) -> dict[str, str]:
        """The tokens and each router's connection, as render.py --print-env writes them."""
        token = quote(TOKENS[TELEPHONY_ENV], safe="")
        return TOKENS | {
            f"OVERFLOW_ROUTER_HTTPCON_{n}":
                f"router{n}=>{url.replace('://', f'://telephony:{token}@', 1).rstrip('/')}"
            for n, url in enumerate(self.routers, 1)}

    @property
    def out(self) -> Path:
        """Where the rendered config and `kamailio.log` are."""
        return self.workdir / (f"kamailio-router-{self.port}" if self.router_url
                               else f"kamailio-static-{self.port}")

    async def start(self) -> None:
        out = self.out
        mode = [a for url in self.routers for a in ("--router", url)] or ["--static"]
        if not self.keepalive:
            mode.append("--no-keepalive")
        render = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "deploy" / "kamailio" / "render.py"), str(self.forces),
            "--out", str(out), "--listen", f"udp:127.0.0.1:{self.port}", *mode,
            "--children", str(self.children), "--route-workers", str(self.route_workers),
            "--breaker-s", str(self.breaker_s), "--plan-max-age-s", str(self.plan_max_age_s),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(render.communicate(), 30)
        if render.returncode != 0:
            raise RuntimeError(f"render.py failed: {stderr.decode()}")
        self.proc = await spawn(KAMAILIO, "-DD", "-E", "-f", stdout.decode().strip(),
                                "-Y", str(out), "-m", "256", "-M", "16",
                                log=out / "kamailio.log", env=self.env())
        await wait_sip(self.port)

    async def stop(self) -> None:
        await stop(self.proc)
        self.proc = None


@dataclass
class FakeRouter:
    """Answers every route query with `answer`, or, while `hung`, takes it and never replies."""

    answer: str = ""
    hung: bool = True
    asked: int = 0

    async def route(self, request: web.Request) -> web.Response:
        self.asked += 1
        if self.hung:
            await asyncio.sleep(60)  # Kamailio gives up long before
        return web.Response(text=self.answer)

    async def end(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/v1/route", self.route)
        app.router.add_post("/v1/calls/{call_id}/end", self.end)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        port = tcp_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


# ---- the stage-1 caller ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    at: float  # epoch seconds when the 200 OK arrived
    call: int
    centre: str
    setup_s: float  # from sending the INVITE to the 200 OK


@dataclass
class CallerRun:
    created: int
    successful: int
    failed: int
    elapsed_s: float
    answered: list[Answered] = field(default_factory=list)

    def centres(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.answered:
            if start <= a.at < end:
                out[a.centre] = out.get(a.centre, 0) + 1
        return out


async def place_calls(proxy_port: int, workdir: Path, *, origin: str, service: str = "999",
                      rate: float, calls: int, hold_ms: int, max_concurrent: int | None = None,
                      timeout_s: float = 120.0, log: bool = True) -> CallerRun:
    """Run a sipp caller to completion (bounded by `calls` and `timeout_s`) and read its stats."""
    run = workdir / f"caller-{origin}-{time.monotonic_ns()}"
    run.mkdir()
    argv = [SIPP or "sipp", f"127.0.0.1:{proxy_port}", "-sf", str(HERE / "uac.xml"),
            "-i", "127.0.0.1", "-p", str(udp_port()), "-s", service, "-key", "origin", origin,
            "-r", str(rate), "-m", str(calls), "-d", str(hold_ms), "-nostdin",
            "-timeout", f"{int(timeout_s)}s", "-trace_stat", "-stf", str(run / "stat.csv"),
            "-trace_err", "-error_file", str(run / "errors.log")]
    if log:
        argv += ["-trace_logs", "-log_file", str(run / "answered.log")]
    if max_concurrent:
        argv += ["-l", str(max_concurrent)]
    started = time.perf_counter()
    proc = await spawn(*argv, log=run / "sipp.out", cwd=run)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s + 10)
    finally:
        await stop(proc)
    elapsed = time.perf_counter() - started
    with (run / "stat.csv").open(newline="") as f:
        final = list(csv.DictReader(f, delimiter=";"))[-1]
    answered = []
    if log:
        for line in (run / "answered.log").read_text().splitlines():
            sec, usec, call, centre, sec0, usec0 = line.split()
            at = float(sec) + float(usec) / 1e6
            answered.append(Answered(at, int(call), centre,
                                     at - float(sec0) - float(usec0) / 1e6))
    return CallerRun(created=int(final["TotalCallCreated"]),
                     successful=int(final["SuccessfulCall(C)"]),
                     failed=int(final["FailedCall(C)"]), elapsed_s=elapsed, answered=answered)
