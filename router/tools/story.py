"""The demo's show: callers, the simulated centres' failures, and what is narrated.

The story is told once: every centre up; the Met's phones and CAD fail; partners take its
calls and hand the incidents back, held while the Met's CAD is down (some miss their deadline
and are escalated); the phones return before the CAD; the CAD returns, the Met ramps back and
settles at NORMAL; the backlog drains. Then the summary. Tests drive the same injections
(`fail`, `restore_phones`, `restore_cad`) themselves, with the script off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiomqtt
from aiohttp import web

from adapters.sim import sim_cad
from router.config import RouterConfig
from router.engine.model import CentreState, Snapshot
from router.engine.rules import headline
from router.http.app import RouterApp
from router.infra.timefmt import iso
from router.tools.centres import SimCentre

UTILISATION = 0.55  # of each centre's handlers, in normal running
SHARE_999 = 0.4
TELEMETRY_EVERY_S = 1.0
REPORT_EVERY_S = 10.0
OUTCOMES = ("home", "partner", "last resort", "shed to queue", "announcement",
            "retried after an undetected failure")


@dataclass(frozen=True, slots=True)
class Pace:
    """When the story's events happen (seconds from the start) and how long calls last.
    `scripted=False`: no outage of its own; whoever runs the demo injects failures."""

    fail_at_s: float = 20.0
    phones_back_at_s: float = 55.0
    cad_back_at_s: float = 90.0
    mean_handling_s: float = 20.0  # compressed: real 999 calls take minutes
    ramp_step_s: float = 8.0  # the recovery ramp's steps (the bundled config's are 30 s)
    answers_s: float = 30.0  # once settled, for the Met's dispatchers to answer what arrived
    deadlines_s: dict[str, float] | None = None  # handoff delivery deadlines, if not the config's
    scripted: bool = True


@dataclass
class Tally:
    """Counts for one period: the periodic lines use a fresh one every REPORT_EVERY_S, the
    summary one for the whole run; never mixed in one line."""

    by_destination: collections.Counter[str] = field(default_factory=collections.Counter)
    met_by_destination: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    handoffs: collections.Counter[str] = field(default_factory=collections.Counter)

    def routed(self, origin: str, dest: str, reason: str, action: str | None) -> None:
        self.by_destination[dest] += 1
        outcome = ("home" if reason == "home" else "last resort" if reason == "last_resort"
                   else ("announcement" if action == "announcement" else "shed to queue")
                   if reason == "shed" else "partner")
        self.outcomes[outcome] += 1
        if origin == "met":
            self.met_by_destination[f"{dest} ({outcome})" if outcome != "partner" else dest] += 1


class Demo:
    def __init__(self, config: RouterConfig, service: RouterApp, sip_ports: dict[str, int],
                 tokens: dict[str, str], mqtt_port: int | None, pace: Pace, seed: int = 2025,
                 say: Callable[[str], None] | None = None):
        self.config = config
        self.service = service
        self.tokens = tokens
        self.mqtt_port = mqtt_port
        self.pace = pace
        self.rng = random.Random(seed)
        self.centres = {fid: SimCentre(fid, f.centre.handlers_on_duty, sip_port=sip_ports[fid],
                                       mean_handling_s=pace.mean_handling_s)
                        for fid, f in config.forces.items()}
        self.t0 = time.monotonic()
        self.calls: dict[str, tuple[str, str, str]] = {}  # call_id -> (origin, service, dest)
        self.window = Tally()
        self.total = Tally()
        self.base = ""
        self._seq = 0
        self._states: dict[str, tuple[str, str]] = {}  # force → (state, headline)
        self._all_up = False
        self.story_over = asyncio.Event()
        self._print = say or (lambda text: print(text, flush=True))

    def say(self, text: str) -> None:
        self._print(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    # ---- the centres' own endpoint, the injections ----------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        centre = self.centres.get(request.match_info["force"])
        if centre is None or not centre.cad_up:
            return web.json_response({"status": "down"}, status=503)
        return web.json_response({"status": "ok"})

    def fail(self, force: str = "met", *, phones: bool = True, cad: bool = True) -> None:
        centre = self.centres[force]
        if phones:
            centre.telephony_up = False
        if cad:
            centre.cad_up = sim_cad(force).up = False

    def restore_phones(self, force: str = "met") -> None:
        self.centres[force].telephony_up = True

    def restore_cad(self, force: str = "met") -> None:
        self.centres[force].cad_up = sim_cad(force).up = True

    # ---- running --------------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession, until: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._arrivals(session, fid)) for fid in self.centres]
            tasks += [tg.create_task(self._handling(session)), tg.create_task(self._report())]
            if self.pace.scripted:
                tasks.append(tg.create_task(self._story()))
            if self.mqtt_port is not None:
                tasks.append(tg.create_task(self._telemetry()))
            await until.wait()
            for task in tasks:
                task.cancel()

    async def _story(self) -> None:
        pace = self.pace
        await self._at(pace.fail_at_s)
        self.say("⚠ INJECTED: the Met's CAD and call handling fail "
                 "(SIP stops answering, CAD health returns 503)")
        self.fail("met")
        await self._at(pace.phones_back_at_s)
        self.say("✓ INJECTED: the Met's phones are back; its CAD is still down")
        self.restore_phones("met")
        await self._at(pace.cad_back_at_s)
        self.say("✓ INJECTED: the Met's CAD is restored")
        self.restore_cad("met")
        while not self._settled():  # noqa: ASYNC110 - two parts' states, polled as a person would
            await asyncio.sleep(0.5)
        self.say("the Met is NORMAL with its CAD up, and every handoff held for it is "
                 f"delivered; {pace.answers_s:.0f}s for its dispatchers to answer them")
        await asyncio.sleep(pace.answers_s)
        self.say("the story is over")
        self.story_over.set()

    async def _at(self, second: float) -> None:
        await asyncio.sleep(max(second - (time.monotonic() - self.t0), 0.0))

    def _settled(self) -> bool:
        desk = self.service.runtime.desk
        state = self.service.watcher.snapshot.get("met").state
        view = self.service.watcher.snapshot.get("met")
        return (state is CentreState.NORMAL and view.cad_up and desk is not None
                and not desk.backlog().get("met"))

    async def _arrivals(self, session: aiohttp.ClientSession, fid: str) -> None:
        rate = self.centres[fid].handlers * UTILISATION / self.pace.mean_handling_s
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
        dest, action = decision["destination"], decision.get("action")
        centre = self.centres[dest]
        if action != "announcement" and not centre.telephony_up:
            # routed before the failure was detected: the caller hears nothing and redials
            for tally in (self.window, self.total):
                tally.outcomes[OUTCOMES[-1]] += 1
            await self._end(session, call_id)
            if not call_id.endswith("r"):
                await self._place(session, f"{call_id}r", service, origin)
            return
        for tally in (self.window, self.total):
            tally.routed(origin, dest, decision["reason"], action)
        if action == "announcement":  # played by the platform, then cleared
            await self._end(session, call_id)
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
                step = "handed back" if resp.status in (200, 202) else "refused"
                for tally in (self.window, self.total):
                    tally.handoffs[step] += 1

    async def _telemetry(self) -> None:
        """Each centre reports its queue, as a real ACD would over MQTT."""
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.mqtt_port or 0, timeout=5) as client:
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

    # ---- narration ------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """Once every centre is known, say so naming each; then narrate every change of a
        centre's state, and of what the policy does with its calls (a CAD down diverts a
        centre that is still `normal`), with where its 999s now go."""
        diversions = self.service.calls.diversions(snapshot)
        views = {fid: snapshot.get(fid) for fid in self.config.forces}
        now = {fid: (v.state.value, headline(v.state, diversions[fid])) for fid, v in views.items()}
        if not self._all_up:
            if any(v.state is CentreState.UNKNOWN for v in views.values()):
                return
            self._all_up = True
            self._states = now
            self.say("every centre has evidence: " + ", ".join(
                f"{fid} {label.upper()}" for fid, (_, label) in now.items()))
            return
        for fid, (state, label) in now.items():
            before = self._states.get(fid)
            if before == (state, label):
                continue
            self._states[fid] = (state, label)
            view = views[fid]
            change = (f"{before[0]} → {state.upper()}" if before and before[0] != state
                      else state.upper())
            table = self.service.calls.routing_table(snapshot)[fid]["999"]
            where = ", ".join(f"{s['destination']} {round(s['share'] * 100)}%" for s in table)
            self.say(f"{fid}: {change} ({label}; "
                     f"telephony {'up' if view.telephony_up else 'DOWN'}, "
                     f"CAD {'up' if view.cad_up else 'DOWN'}); its 999 calls now go to {where}")

    async def _report(self) -> None:
        """Every REPORT_EVERY_S, what happened in those seconds only."""
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            w, self.window = self.window, Tally()
            met = ", ".join(f"{d} {n}" for d, n in w.met_by_destination.most_common()) or "none"
            steps = ", ".join(f"{n} {s}" for s, n in sorted(w.handoffs.items())) or "none"
            self.say(f"last {REPORT_EVERY_S:.0f}s: {sum(w.by_destination.values())} calls routed "
                     f"(the Met's: {met}); {w.outcomes[OUTCOMES[-1]]} redialled after an "
                     f"undetected failure; handoffs: {steps}")

    def on_status(self, message: dict[str, Any]) -> None:
        """Count each handoff step; narrate the first acceptance and completion, the first
        few rejections and every escalation."""
        status = str(message.get("status"))
        for tally in (self.window, self.total):
            tally.handoffs[status] += 1
        n = self.total.handoffs[status]
        who = f"{message.get('to')} ({message.get('by') or 'a dispatcher'})"
        if status == "acknowledged" and n == 1:
            self.say(f"handoff {message.get('incident_id')} from {message.get('from')} accepted "
                     f"by {who}; the sender is told on MQTT and at its notify_url")
        elif status in ("rejected", "offered") and n <= 3:
            self.say(f"✗ handoff {message.get('incident_id')} REJECTED by {who}: "
                     f"{message.get('cause')}; back to {message.get('from')} at once")
        elif status == "completed" and n == 1:
            self.say(f"handoff {message.get('incident_id')} completed at {message.get('to')}")
        elif status == "escalated" and n <= 3:
            self.say(f"⚠ handoff {message.get('incident_id')} to {message.get('to')} ESCALATED: "
                     f"{message.get('detail')}; a printable sheet is in the spool folder")

    def summary(self) -> list[str]:
        return summary(self.total, time.monotonic() - self.t0)

    def _auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def summary(t: Tally, elapsed_s: float) -> list[str]:
    """The whole run in a few lines."""
    h = t.handoffs
    return [
        f"SUMMARY after {elapsed_s:.0f}s",
        f"  calls routed: {sum(t.by_destination.values())}; by destination: "
        + ", ".join(f"{d} {n}" for d, n in t.by_destination.most_common()),
        "  the Met's calls went to: "
        + (", ".join(f"{d} {n}" for d, n in t.met_by_destination.most_common()) or "none"),
        "  answer outcome: " + ", ".join(f"{o} {t.outcomes[o]}" for o in OUTCOMES),
        f"  handoffs: {h['handed back']} handed back by partners, {h['delivered']} delivered, "
        f"{h['acknowledged']} acknowledged, {h['rejected'] + h['offered']} rejected, "
        f"{h['completed']} completed, {h['on_paper']} handled on paper",
        f"  escalations: {h['escalated']}"
        + (" (sheets in the spool folder)" if h["escalated"] else ""),
    ]
