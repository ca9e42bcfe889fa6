"""`overflow-router demo`: the real service on simulated force centres, with a Met outage.

Everything the router touches is real and on loopback: each simulated centre answers SIP
OPTIONS over UDP, serves a CAD health URL over HTTP and publishes telemetry over MQTT; callers
ask the router over HTTP and hang up when a simulated call handler is done; partners hand
incidents back over HTTP. Only time is compressed: calls last seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import yaml
from aiohttp import web

from adapters.sim import sim_cad
from router.config import RouterConfig
from router.engine.model import Snapshot
from router.engine.rules import headline
from router.http.app import RouterApp
from router.infra.timefmt import iso
from router.tools.centres import SimCentre, SipOptionsResponder

log = logging.getLogger("demo")

BUNDLED = Path(__file__).resolve().parents[2] / "config" / "forces.yaml"
MEAN_HANDLING_S = 20.0  # compressed: real 999 calls take minutes
UTILISATION = 0.55  # of each centre's handlers, in normal running
SHARE_999 = 0.4
OUTAGE_START_S, OUTAGE_END_S, CYCLE_S = 20.0, 80.0, 150.0
TELEMETRY_EVERY_S = 1.0
REPORT_EVERY_S = 10.0
# the simulated CADs' dispatchers: accept a handoff some seconds after it arrives, now and
# then reject one ("location outside our area"), close it later (compressed, like the calls)
DISPATCHERS = {"ack_after_s": 6.0, "answer_jitter_s": 4.0, "complete_after_s": 20.0,
               "reject_share": 0.05, "seed": 2025}


# ---- wiring the demo config -----------------------------------------------------------------


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(workdir: Path, http_port: int, mqtt_port: int | None
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
    raw["handoff"]["store"] = f"sqlite:///{workdir / 'handoffs.db'}"
    raw["handoff"]["spool_dir"] = str(workdir / "spool")
    raw["service"]["audit_log"] = str(workdir / "audit.jsonl")
    return RouterConfig.model_validate(raw), sip_socks


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def mqtt_broker() -> AsyncIterator[int | None]:
    """The configured local broker if one answers; else a private Mosquitto; else none."""
    if _listening(1883):
        yield 1883
        return
    binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    if binary is None:
        print("  (no MQTT broker: install mosquitto for telemetry; probes alone will do)")
        yield None
        return
    port = _free_port(socket.SOCK_STREAM)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        conf.flush()
        proc = await asyncio.create_subprocess_exec(
            binary, "-c", conf.name, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(50):
                if _listening(port):
                    break
                await asyncio.sleep(0.1)
            yield port
        finally:
            proc.terminate()
            await proc.wait()


# ---- the show -------------------------------------------------------------------------------


class Demo:
    def __init__(self, config: RouterConfig, service: RouterApp, sip_ports: dict[str, int],
                 tokens: dict[str, str], mqtt_port: int | None, seed: int = 2025):
        self.config = config
        self.service = service
        self.tokens = tokens
        self.mqtt_port = mqtt_port
        self.rng = random.Random(seed)
        self.centres = {fid: SimCentre(fid, f.centre.handlers_on_duty, sip_port=sip_ports[fid],
                                       mean_handling_s=MEAN_HANDLING_S)
                        for fid, f in config.forces.items()}
        self.t0 = time.monotonic()
        self.calls: dict[str, tuple[str, str, str]] = {}  # call_id -> (origin, service, dest)
        self.window: collections.Counter[str] = collections.Counter()
        self.handoffs: collections.Counter[str] = collections.Counter()  # steps by status
        self.base = ""
        self._seq = 0
        self._states: dict[str, tuple[str, str]] = {}  # force → (state, headline)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    # the centres' own endpoints
    async def health(self, request: web.Request) -> web.Response:
        centre = self.centres.get(request.match_info["force"])
        if centre is None or not centre.cad_up:
            return web.json_response({"status": "down"}, status=503)
        return web.json_response({"status": "ok"})

    async def run(self, session: aiohttp.ClientSession, duration_s: float | None) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._arrivals(session, fid)) for fid in self.centres]
            tasks += [tg.create_task(self._handling(session)),
                      tg.create_task(self._outages()),
                      tg.create_task(self._report())]
            if self.mqtt_port is not None:
                tasks.append(tg.create_task(self._telemetry()))
            if duration_s is not None:
                await asyncio.sleep(duration_s)
                for task in tasks:
                    task.cancel()

    async def _arrivals(self, session: aiohttp.ClientSession, fid: str) -> None:
        rate = self.centres[fid].handlers * UTILISATION / MEAN_HANDLING_S
        while True:
            await asyncio.sleep(self.rng.expovariate(rate))
            service = "999" if self.rng.random() < SHARE_999 else "101"
            self._seq += 1
            await self._place(session, f"demo-{self._seq}", service, fid)

    async def _place(self, session: aiohttp.ClientSession, call_id: str, service: str,
                     origin: str) -> None:
        try:
            async with session.post(f"{self.base}/v1/route", json={
                "call_id": call_id, "service": service, "origin": origin},
                    headers=self._auth("telephony")) as resp:
                decision = await resp.json()
                if resp.status != 200:
                    raise ValueError(decision.get("message"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.say(f"route request failed: {exc!r}")
            return
        dest = decision["destination"]
        self.window[f"{origin}>{dest}:{decision['reason']}"] += 1
        if decision.get("action") == "announcement":  # played by the platform, then cleared
            await self._end(session, call_id)
            return
        centre = self.centres[dest]
        if not centre.telephony_up:  # routed before the failure was detected: caller retries
            self.window["retried"] += 1
            await self._end(session, call_id)
            if not call_id.endswith("r"):
                await self._place(session, f"{call_id}r", service, origin)
            return
        self.calls[call_id] = (origin, service, dest)
        centre.take(call_id, time.monotonic())

    async def _handling(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for centre in self.centres.values():
                for call_id in centre.tick(now, self.rng):
                    await self._end(session, call_id)
                    origin, service, dest = self.calls.pop(call_id)
                    if dest != origin:
                        await self._hand_off(session, call_id, origin, service, dest)

    async def _end(self, session: aiohttp.ClientSession, call_id: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(f"{self.base}/v1/calls/{call_id}/end",
                                    headers=self._auth("telephony")):
                pass

    async def _hand_off(self, session: aiohttp.ClientSession, call_id: str, origin: str,
                        service: str, partner: str) -> None:
        """The partner that answered logs the incident and hands it to the home force's CAD."""
        incident = {
            "incident_id": f"{partner.upper()}-{call_id}", "from": partner, "to": origin,
            "priority": "P1" if service == "999" else "P3", "service": service,
            "call_id": call_id, "opened_at": iso(time.time(), "seconds"),
            "location": {"lat": 51.5 + self.rng.uniform(-0.2, 0.2),
                         "lon": -0.12 + self.rng.uniform(-0.3, 0.3)},
            "category": "demo", "summary": f"{service} call for {origin} answered by {partner}",
        }
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(f"{self.base}/v1/handoffs", json=incident,
                                    headers=self._auth(f"partner:{partner}")) as resp:
                self.handoffs["submitted" if resp.status in (200, 202) else "refused"] += 1

    async def _outages(self) -> None:
        met = self.centres["met"]
        while True:
            await asyncio.sleep(OUTAGE_START_S)
            self.say("⚠ INJECTED: the Met's CAD and call handling fail "
                     "(SIP stops answering, CAD health returns 503)")
            met.telephony_up = met.cad_up = sim_cad("met").up = False
            await asyncio.sleep(OUTAGE_END_S - OUTAGE_START_S)
            self.say("✓ INJECTED: the Met's systems are restored")
            met.telephony_up = met.cad_up = sim_cad("met").up = True
            await asyncio.sleep(CYCLE_S - OUTAGE_END_S)

    async def _telemetry(self) -> None:
        """Each centre reports its queue, as a real ACD would over MQTT."""
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.mqtt_port or 1883, timeout=5) as client:
                    while True:
                        now = time.monotonic()
                        for fid, centre in self.centres.items():
                            if centre.telephony_up:  # a dead centre says nothing
                                await client.publish(f"overflow/centres/{fid}/telemetry",
                                                     json.dumps(centre.telemetry(now)))
                        await asyncio.sleep(TELEMETRY_EVERY_S)
            except aiomqtt.MqttError as exc:
                self.say(f"telemetry publisher lost the broker ({exc}); retrying")
                await asyncio.sleep(1)

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """Narrate every change of a centre's state, and of what the policy does with its calls
        (a CAD down diverts a centre that is still `normal`), with where its 999s now go."""
        diversions = self.service.calls.diversions(snapshot)
        for fid in self.config.forces:
            view = snapshot.get(fid)
            state, label = view.state.value, headline(view.state, diversions[fid])
            before = self._states.get(fid)
            if before == (state, label):
                continue
            self._states[fid] = (state, label)
            if before is None:
                continue
            change = f"{before[0]} → {state.upper()}" if before[0] != state else state.upper()
            table = self.service.calls.routing_table(snapshot)[fid]["999"]
            where = ", ".join(f"{s['destination']} {round(s['share'] * 100)}%" for s in table)
            self.say(f"{fid}: {change} ({label}; "
                     f"telephony {'up' if view.telephony_up else 'DOWN'}, "
                     f"CAD {'up' if view.cad_up else 'DOWN'}); its 999 calls now go to {where}")

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            window, self.window = self.window, collections.Counter()
            met: collections.Counter[str] = collections.Counter()
            for key, n in window.items():
                if key.startswith("met>"):
                    dest, _, reason = key[4:].partition(":")
                    met[dest if reason != "shed" else "shed(101)"] += n
            total = sum(n for k, n in window.items() if ">" in k)
            spread = ", ".join(f"{d} {n}" for d, n in met.most_common()) or "none"
            self.say(f"last {REPORT_EVERY_S:.0f}s: {total} calls routed; from the Met: {spread}; "
                     f"retried after undetected failure: {window['retried']}; "
                     f"incidents handed back by partners: {self.handoffs['submitted']}, "
                     f"in the Met's CAD: {len(sim_cad('met').received)}; so far "
                     f"{self.handoffs['delivered']} delivered, {self.handoffs['acknowledged']} "
                     f"accepted by a dispatcher, {self.handoffs['rejected']} rejected, "
                     f"{self.handoffs['completed']} completed")

    def on_status(self, message: dict[str, Any]) -> None:
        """Narrate what people do with handed-back incidents: the first acceptance and the
        first completion, and the first few rejections (each goes back to its sender at once);
        the report counts the rest."""
        status = str(message.get("status"))
        self.handoffs[status] += 1
        who = f"{message.get('to')} ({message.get('by') or 'a dispatcher'})"
        if status == "acknowledged" and self.handoffs[status] == 1:
            self.say(f"handoff {message.get('incident_id')} from {message.get('from')} accepted "
                     f"by {who}; the sender is told on MQTT and at its notify_url")
        elif status in ("rejected", "offered") and self.handoffs[status] <= 3:
            self.say(f"✗ handoff {message.get('incident_id')} REJECTED by {who}: "
                     f"{message.get('cause')}; back to {message.get('from')} at once")
        elif status == "completed" and self.handoffs[status] == 1:
            self.say(f"handoff {message.get('incident_id')} completed at {message.get('to')}")

    def _auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def _tokens(config: RouterConfig) -> tuple[dict[str, str], dict[str, str]]:
    """A fresh random token for every role the config names: (role -> token, env)."""
    by_role: dict[str, str] = {}
    environ = dict(os.environ)
    for token in config.service.tokens:
        value = environ.get(token.env) or secrets.token_urlsafe(18)
        environ[token.env] = value
        by_role.setdefault(token.role, value)
    return by_role, environ


async def run_demo(port: int = 8080, duration_s: float | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="overflow-demo-") as tmp:
        async with mqtt_broker() as mqtt_port:
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
            config, sip_socks = demo_config(Path(tmp), sim_port, mqtt_port)
            sip_ports = {fid: int(s.getsockname()[1]) for fid, s in sip_socks.items()}
            tokens, environ = _tokens(config)
            service = RouterApp(config, None, environ)
            demo = Demo(config, service, sip_ports, tokens, mqtt_port)
            demo_ref.append(demo)
            loop = asyncio.get_running_loop()
            transports = []
            for fid, centre in demo.centres.items():
                transport, _ = await loop.create_datagram_endpoint(
                    lambda c=centre: SipOptionsResponder(c),  # type: ignore[misc]
                    sock=sip_socks[fid])
                transports.append(transport)
            service.watcher.add_listener(demo.on_snapshot)
            service.status_listeners.append(demo.on_status)
            stop = asyncio.Event()

            serving = asyncio.Event()

            async def started(bound: int) -> None:
                demo.base = f"http://127.0.0.1:{bound}"
                serving.set()
                print(f"\noverflow-router demo — dashboard: {demo.base}/#token={tokens['manager']}")
                print(f"  admin CLI: OVERFLOW_TOKEN={tokens['manager']} overflow-router status "
                      f"--url {demo.base}")
                print(f"  metrics: {demo.base}/metrics    MQTT: "
                      f"{'127.0.0.1:' + str(mqtt_port) if mqtt_port else 'off'}")
                print(f"  the Met fails at +{OUTAGE_START_S:.0f}s and recovers at "
                      f"+{OUTAGE_END_S:.0f}s, every {CYCLE_S:.0f}s; Ctrl-C stops.\n", flush=True)

            async def show() -> None:
                await serving.wait()
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=5)) as session:
                    demo.t0 = time.monotonic()
                    await demo.run(session, duration_s)
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(service.run("127.0.0.1", port, stop, started))
                    shower = tg.create_task(show())
                    await stop.wait()
                    shower.cancel()
            finally:
                for transport in transports:
                    transport.close()
                await runner.cleanup()
    return 0
