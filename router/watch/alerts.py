"""Diversion alerts: tell partners when a force's calls start, change or stop coming to them.

Whether a force is diverting, and why, is the policy's answer (router/engine/rules.py), never
a second reading of the centre's state: an overloaded centre still under `overflow_queue`
keeps its calls and raises no alert, and a centre whose CAD is down with `on_cad_down:
overflow` does.

NENA i3's "notify" action: a partner taking another force's calls should hear so from the
router, not discover it from its queue. Each alert is published on `overflow/alerts` and
POSTed to the `notify_url` of every partner named in the origin's overflow routes. Delivery
runs in its own task with timeouts and a bounded queue, so a slow partner never delays routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from router.config import RouterConfig
from router.engine.model import CentreView, Snapshot
from router.engine.rules import HomeShare
from router.infra.mqtt_link import MqttLink
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

POST_TIMEOUT_S = 2.0
POST_ATTEMPTS = 3
MAX_PENDING = 1000
MAX_CONCURRENT_POSTS = 8
# a router that is not the leader keeps the alerts it would have raised this long: taking over
# (router/infra/leader.py: within 4 s of the leader's death), it sends those the dead leader
# may not have, so a diversion starting in the gap is still told (perhaps twice)
TAKEOVER_WINDOW_S = 10.0


class Alerter:
    def __init__(self, config: RouterConfig, mqtt: MqttLink | None,
                 wall_clock: Callable[[], float] = time.time):
        self.config = config
        self._mqtt = mqtt
        self._wall = wall_clock
        self._current: dict[str, HomeShare] = {}
        self._outbox: deque[tuple[str, str, dict[str, Any]]] = deque(maxlen=MAX_PENDING)
        self._wake = asyncio.Event()
        self.sent: list[dict[str, Any]] = []  # recent alerts, newest last (for status pages)
        self.speaking = True  # False while another router leads (router/infra/leader.py): it
        # tells partners, and publishes the retained state (Publisher)
        self._quiet: deque[tuple[float, dict[str, Any]]] = deque(maxlen=MAX_PENDING)

    def speak(self, speaking: bool) -> None:
        """This router leads now (or no longer); taking over, it sends what it kept quiet."""
        self.speaking = speaking
        if speaking:
            recent = self._wall() - TAKEOVER_WINDOW_S
            for at, alert in self._quiet:
                if at >= recent:
                    self._send(alert)
        self._quiet.clear()

    def observe(self, diversions: Mapping[str, HomeShare], snapshot: Snapshot) -> None:
        """Raise started/changed/stopped alerts from the policy's own answer. Never awaits."""
        for origin in self.config.forces:
            share = diversions.get(origin)
            now = share if share is not None and share.diverting else None
            before = self._current.get(origin)
            if (now.reason if now else None) == (before.reason if before else None):
                if now is not None:
                    self._current[origin] = now  # the same diversion, perhaps a new ramp step
                continue
            event = "started" if before is None else "stopped" if now is None else "changed"
            if now is None:
                del self._current[origin]
            else:
                self._current[origin] = now
            self._raise(origin, event, now, before, snapshot.get(origin))

    def _raise(self, origin: str, event: str, now: HomeShare | None, before: HomeShare | None,
               view: CentreView) -> None:
        force = self.config.forces[origin]
        partners = sorted({r.to for routes in force.overflow.values() for r in routes})
        alert: dict[str, Any] = {
            "type": "diversion", "event": event, "origin": origin, "state": view.state.value,
            "reason": now.reason.value if now else None,
            "cause": now.cause.value if now and now.cause else None,
            "share_diverted": round(1.0 - now.share, 4) if now else 0.0,
            "previous_reason": before.reason.value if before else None,
            "partners": partners, "at": iso(self._wall()),
        }
        log.warning("diversion %s for %s: %s", event, origin,
                    alert["reason"] or alert["previous_reason"])
        self.sent = [*self.sent[-49:], alert]
        if self.speaking:
            self._send(alert)
        else:
            self._quiet.append((self._wall(), alert))

    def _send(self, alert: dict[str, Any]) -> None:
        if self._mqtt is not None:
            self._mqtt.publish("alerts", alert)
        for partner in alert["partners"]:
            self.post(partner, alert)

    def post(self, force: str, message: dict[str, Any]) -> None:
        """Queue `message` for `force`'s `notify_url`, if it has one (a handoff's sender
        hears how it is going this way too)."""
        url = self.config.forces[force].notify_url if force in self.config.forces else None
        if url:
            if len(self._outbox) == self._outbox.maxlen:
                log.error("alert outbox full: dropping the oldest notification")
            self._outbox.append((force, url, message))
            self._wake.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver queued notifications until cancelled, a few at a time."""
        slots = asyncio.Semaphore(MAX_CONCURRENT_POSTS)
        async with asyncio.TaskGroup() as tg:
            while True:
                while self._outbox:
                    partner, url, alert = self._outbox.popleft()
                    await slots.acquire()
                    task = tg.create_task(self._post(session, partner, url, alert))
                    task.add_done_callback(lambda _: slots.release())
                self._wake.clear()
                await self._wake.wait()

    async def _post(self, session: aiohttp.ClientSession, partner: str, url: str,
                    alert: dict[str, Any]) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(POST_ATTEMPTS), wait=wait_exponential(min=0.2, max=2),
            retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError)), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    async with session.post(
                            url, json=alert,
                            timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S)) as response:
                        response.raise_for_status()
        except (aiohttp.ClientError, TimeoutError) as exc:
            about = (f"the {alert['origin']} diversion" if "origin" in alert
                     else f"handoff {alert.get('handoff_id')} {alert.get('status')}")
            log.error("could not notify %s at %s of %s after %d attempts: %s",
                      partner, url, about, POST_ATTEMPTS, exc or type(exc).__name__)
