"""`overflow-router demo`: the real service on simulated force centres, with a Met outage.

Everything the router touches is real and on loopback: each simulated centre answers SIP
OPTIONS over UDP, serves a CAD health URL over HTTP and publishes telemetry over MQTT; callers
ask the router over HTTP and hang up when a simulated call handler is done; partners hand
incidents back over HTTP. Only time is compressed: calls last seconds, not minutes. The story
and its narration are in router.tools.story.

The demo never touches what it did not start: its broker is a private Mosquitto on a free
port (or one named with --mqtt-port), and a port in use is said in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from router.config import RouterConfig
from router.http.app import RouterApp
from router.tools.centres import SipOptionsResponder
from router.tools.story import Demo, Pace

BUNDLED = Path(__file__).resolve().parents[2] / "config" / "forces.yaml"
# the simulated CADs' dispatchers: accept a handoff some seconds after it arrives, now and
# then reject one ("location outside our area"), close it later (compressed, like the calls)
DISPATCHERS = {"ack_after_s": 6.0, "answer_jitter_s": 4.0, "complete_after_s": 20.0,
               "reject_share": 0.05, "seed": 2025}


STORY = Pace()


class DemoError(Exception):
    """Something the person running the demo must fix, said in one line."""


@dataclass(frozen=True, slots=True)
class Options:
    port: int = 8080
    duration_s: float | None = None
    mqtt_port: int | None = None  # a broker the person asked for; None: a private one
    pace: Pace = STORY
    signals: bool = True  # Ctrl-C stops it (not in a thread: tests)
    stop: asyncio.Event | None = None  # set by whoever runs it in-process, to stop it
    ready: Callable[[Demo], None] | None = None  # told once serving, with the demo
    say: Callable[[str], None] | None = None


# ---- wiring the demo config -----------------------------------------------------------------


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(workdir: Path, http_port: int, mqtt_port: int | None, pace: Pace = STORY
                ) -> tuple[RouterConfig, dict[str, socket.socket]]:
    """The bundled config, pointed at the simulated centres on free loopback ports. Each
    centre's SIP socket is returned bound, so no other process can take its port meanwhile."""
    raw = yaml.safe_load(BUNDLED.read_text())
    sip_socks: dict[str, socket.socket] = {}
    for fid, force in raw["forces"].items():
        sock = sip_socks[fid] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        force["centre"]["probes"] = [
            {"kind": "sip", "target": f"127.0.0.1:{port}", "component": "telephony"},
            {"kind": "http", "target": f"http://127.0.0.1:{http_port}/centres/{fid}/health",
             "component": "cad"},
        ]
        force["cad"] = {"adapter": "sim", "options": DISPATCHERS}
    raw["mqtt"] = {"enabled": mqtt_port is not None, "host": "127.0.0.1",
                   "port": mqtt_port or 1883, "prefix": "overflow/"}
    raw["health"]["recovery"]["step_s"] = pace.ramp_step_s
    raw["handoff"]["store"] = f"sqlite:///{workdir / 'handoffs.db'}"
    raw["handoff"]["spool_dir"] = str(workdir / "spool")
    if pace.deadlines_s is not None:
        raw["handoff"]["deadlines_s"] = pace.deadlines_s
    raw["service"]["audit_log"] = str(workdir / "audit.jsonl")
    return RouterConfig.model_validate(raw), sip_socks


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def check_port(port: int) -> None:
    """Raise DemoError if `port` cannot be bound on loopback (before anything starts)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DemoError(f"port {port} is not free ({exc.strerror}): choose another, e.g. "
                            f"make demo PORT={port + 1}") from None


@contextlib.asynccontextmanager
async def mqtt_broker(asked: int | None = None) -> AsyncIterator[int | None]:
    """The broker the person named (it must answer), else a private Mosquitto on a free port,
    else none. Never a broker that merely happens to be running."""
    if asked is not None:
        if not _listening(asked):
            raise DemoError(f"no MQTT broker answers on 127.0.0.1:{asked} (--mqtt-port)")
        yield asked
        return
    binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    if binary is None:
        print("  (no MQTT broker: install mosquitto for telemetry; probes alone will do)")
        yield None
        return
    port = _free_port(socket.SOCK_STREAM)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        conf.flush()
        proc = await asyncio.create_subprocess_exec(
            binary, "-c", conf.name, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(50):
                if _listening(port) or proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            if not _listening(port):
                print("  (mosquitto did not start: running without telemetry; probes alone "
                      "will do)")
                yield None
            else:
                yield port
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()


def _tokens(config: RouterConfig) -> tuple[dict[str, str], dict[str, str]]:
    """A fresh random token for every role the config names: (role -> token, env)."""
    by_role: dict[str, str] = {}
    environ = dict(os.environ)
    for token in config.service.tokens:
        value = environ.get(token.env) or secrets.token_urlsafe(18)
        environ[token.env] = value
        by_role.setdefault(token.role, value)
    return by_role, environ


def _introduce(demo: Demo, mqtt_port: int | None, duration_s: float | None) -> None:
    """Where to look, and every force in the story."""
    tokens, pace, base = demo.tokens, demo.pace, demo.base
    print(f"\noverflow-router demo — dashboard: {base}/#token={tokens['manager']}")
    print(f"  viewer (no controls): {base}/#token={tokens['viewer']}    wall display: add "
          "&wall=1")
    print(f"  Kent's partner view: {base}/#token={tokens['partner:kent']}")
    print(f"  admin CLI: OVERFLOW_TOKEN={tokens['manager']} overflow-router status "
          f"--url {base}")
    print(f"  metrics: {base}/metrics    MQTT: "
          f"{'127.0.0.1:' + str(mqtt_port) + ' (private)' if mqtt_port else 'off'}")
    print("  the forces:")
    for fid, force in demo.config.forces.items():
        partners = ", ".join(r.to for s, routes in force.overflow.items() if s.value == "999"
                             for r in routes)
        print(f"    {fid:<7} {force.name}: {force.centre.handlers_on_duty} handlers; "
              f"its 999 overflow goes to {partners or 'nobody'}")
    if pace.scripted:
        print(f"  the story, once: the Met fails at +{pace.fail_at_s:.0f}s, its phones return "
              f"at +{pace.phones_back_at_s:.0f}s, its CAD at +{pace.cad_back_at_s:.0f}s; then "
              "it settles at NORMAL, the backlog drains and a summary is printed.")
    print(f"  {'stops after ' + format(duration_s, 'g') + 's' if duration_s else 'Ctrl-C stops'}"
          ".\n", flush=True)


async def run_demo(port: int = 8080, duration_s: float | None = None,
                   options: Options | None = None) -> int:
    """Run the demo; 0 when it ends as asked, 1 with one line on stderr if it cannot start."""
    opts = options or Options(port=port, duration_s=duration_s)
    try:
        check_port(opts.port)
        return await _run(opts)
    except DemoError as exc:
        print(f"overflow-router demo: {exc}", file=sys.stderr)
        return 1


async def _run(opts: Options) -> int:
    with tempfile.TemporaryDirectory(prefix="overflow-demo-") as tmp:
        async with mqtt_broker(opts.mqtt_port) as mqtt_port:
            demo_ref: list[Demo] = []  # the centres' web endpoint exists before the demo does

            async def health(request: web.Request) -> web.Response:
                return await demo_ref[0].health(request)

            sims = web.Application()
            sims.router.add_get("/centres/{force}/health", health)
            runner = web.AppRunner(sims)
            await runner.setup()
            sim_site = web.TCPSite(runner, "127.0.0.1", 0)
            await sim_site.start()
            sim_port = sim_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            config, sip_socks = demo_config(Path(tmp), sim_port, mqtt_port, opts.pace)
            sip_ports = {fid: int(s.getsockname()[1]) for fid, s in sip_socks.items()}
            tokens, environ = _tokens(config)
            service = RouterApp(config, None, environ)
            demo = Demo(config, service, sip_ports, tokens, mqtt_port, opts.pace, say=opts.say)
            demo_ref.append(demo)
            loop = asyncio.get_running_loop()
            transports = []
            try:
                for fid, centre in demo.centres.items():
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda c=centre: SipOptionsResponder(c),  # type: ignore[misc]
                        sock=sip_socks[fid])
                    transports.append(transport)
                service.watcher.add_listener(demo.on_snapshot)
                service.status_listeners.append(demo.on_status)
                return await _serve(opts, service, demo, mqtt_port)
            finally:
                for transport in transports:
                    transport.close()
                await runner.cleanup()


async def _serve(opts: Options, service: RouterApp, demo: Demo, mqtt_port: int | None) -> int:
    stop = opts.stop or asyncio.Event()
    serving = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def started(bound: int) -> None:
        demo.base = f"http://127.0.0.1:{bound}"
        serving.set()
        _introduce(demo, mqtt_port, opts.duration_s)
        if opts.ready is not None:
            opts.ready(demo)

    async def show() -> None:
        await serving.wait()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            demo.t0 = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(demo.run(session, stop))
                tg.create_task(_summarise(demo, stop))
                if opts.duration_s is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), opts.duration_s)
                    stop.set()

    if opts.signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.run("127.0.0.1", opts.port, stop, started))
            tg.create_task(show())
    except* OSError as group:  # the port was taken after all, between the check and the bind
        raise DemoError(f"cannot serve on port {opts.port}: {group.exceptions[0]}") from None
    finally:
        if opts.signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return 0


async def _summarise(demo: Demo, stop: asyncio.Event) -> None:
    """The summary, once: when the story is over, or at the end if that comes first."""
    over = asyncio.ensure_future(demo.story_over.wait())
    ended = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([over, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        over.cancel()
        ended.cancel()
    for line in demo.summary():
        demo._print(line)
    if not stop.is_set():
        demo._print("  the dashboard stays up; Ctrl-C stops.")
