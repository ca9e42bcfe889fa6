"""Tells partners, dashboards and monitoring what the router believes and what it does.

On every new snapshot, and every second for changes that come from calls in flight (a queue
past `max_queue`), it asks the call desk for the policy's plan and publishes what changed:
retained `overflow/state/{force}` (the centre's state and whether its calls are diverted, and
why), retained `overflow/routing/{origin}/{service}` (the current shares), and diversion
alerts (router/watch/alerts.py). After every (re)connection it publishes everything again:
a broker restarted without persistence, or a new one after a reload, has lost the retained
messages that partners and dashboards read on subscribing.

With several routers only the leader publishes (`lead`, router/infra/leader.py), so partners
read one router's view, not several flickering; a router taking over publishes everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from router.config import RouterConfig
from router.engine.calls import CallDesk
from router.engine.rules import diversion_json
from router.infra.listeners import Unsubscribe
from router.infra.mqtt_link import MqttLink
from router.infra.timefmt import iso
from router.watch.alerts import Alerter
from router.watch.health import Transition
from router.watch.watcher import Watcher

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 1.0


class Publisher:
    def __init__(self, config: RouterConfig, *, watcher: Watcher, calls: CallDesk,
                 mqtt: MqttLink | None, wall_clock: Callable[[], float] = time.time,
                 leading: bool = True):
        """`leading`: whether to publish from the start (several routers: once it leads)."""
        self._config = config
        self._watcher = watcher
        self._calls = calls
        self._mqtt = mqtt
        self.alerter = Alerter(config, mqtt, wall_clock)
        self._states: dict[str, dict[str, Any]] = {}  # force → its last transition, as sent
        self._sent: dict[str, Any] = {}  # topic → last payload sent (retained ones only)
        self.alerter.speaking = leading
        self._unsubscribe: list[Unsubscribe] = [
            watcher.add_listener(lambda _: self.refresh()),
            watcher.add_transition_listener(self._on_transition),
        ]
        if mqtt is not None:
            self._unsubscribe.append(mqtt.add_connection_listener(self._on_connection))

    def reconfigure(self, config: RouterConfig) -> None:
        self._config = config
        self.alerter.config = config
        self._states = {f: s for f, s in self._states.items() if f in config.forces}
        self.refresh()

    def lead(self, leading: bool) -> None:
        """This router leads now, or no longer: leading, it publishes everything afresh."""
        self.alerter.speak(leading)
        self._sent.clear()
        self.refresh()

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Alert delivery, and a refresh every second for changes no snapshot announces."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.alerter.run(session), name="alerts")
            while True:
                await asyncio.sleep(REFRESH_INTERVAL_S)
                self.refresh()

    def refresh(self) -> None:
        """Publish what changed in the plan. Never raises: routing must not depend on it."""
        try:
            self._refresh()
        except Exception:
            log.exception("publishing the plan failed")

    def _refresh(self) -> None:
        snapshot = self._watcher.snapshot
        diversions = self._calls.diversions(snapshot)
        self.alerter.observe(diversions, snapshot)
        if self._mqtt is None or not self.alerter.speaking:
            return
        for force, base in self._states.items():
            view = snapshot.get(force)
            message = {**base, "telephony_up": view.telephony_up, "cad_up": view.cad_up,
                       **diversion_json(view.state, diversions[force])}
            self._send(f"state/{force}", message, qos=1)
        for origin, services in self._calls.routing_table(snapshot).items():
            for service, shares in services.items():
                self._send(f"routing/{origin}/{service}",
                           {"origin": origin, "service": service, "destinations": shares})

    def _send(self, topic: str, payload: dict[str, Any], qos: int = 0) -> None:
        if self._sent.get(topic) != payload and self._mqtt is not None:
            self._sent[topic] = payload
            self._mqtt.publish(topic, payload, retain=True, qos=qos)

    def _on_transition(self, t: Transition) -> None:
        self._states[t.force] = {"state": t.after.value,
                                 "since": iso(self._watcher.wall_time(t.at)),
                                 "reason": t.reason, "source": t.source}

    def _on_connection(self, up: bool) -> None:
        if up:  # queued before anything else is sent on the new connection
            self._sent.clear()  # everything again, to a broker that may have lost it
            self.refresh()
