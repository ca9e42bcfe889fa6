"""The owner of live health: probes and telemetry in, one immutable `Snapshot` out.

Every centre's probes and the telemetry subscription feed that centre's `CentreHealth`
machine. After each change the watcher builds a new `Snapshot` and swaps it in with one
assignment, so a routing decision reads either the old state or the new, never half of each.
Each state change is audited, published retained on `overflow/state/{force}`, counted, and
passed to listeners (the routing-table publisher, the handoff desk, diversion alerts).

Fail static: when the broker is gone and every telemetry feed has gone stale, the last
known-good telemetry stands for `health.fail_static_s` (probes still act: they need no broker),
then the watcher falls back to probes alone. Either way it says so in `evidence()`, `status()`
and the `overflow_evidence_fail_static` metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from router.config import Probe, RouterConfig
from router.engine.model import CentreState, Snapshot
from router.infra import metrics
from router.infra.audit import AuditLog, iso
from router.infra.mqtt_link import MqttLink
from router.watch.alerts import Alerter
from router.watch.health import CentreHealth, Component, Override, Transition, probe_id
from router.watch.probes import FailureLog, ProbeResult, run_probe
from router.watch.telemetry import TOPIC_PATTERN, TelemetryError, as_dict, force_of, parse_telemetry

log = logging.getLogger(__name__)

MAX_IDLE_S = 1.0  # housekeeping runs at least this often even with no deadline due
Listener = Callable[[Snapshot], None]


class EvidenceMode(StrEnum):
    LIVE = "live"  # telemetry (when configured) and probes
    FAIL_STATIC = "fail_static"  # broker gone, feeds stale: last known-good telemetry kept
    PROBES_ONLY = "probes_only"  # no broker configured, never reached, or fail static expired


@dataclass(frozen=True, slots=True)
class _LastProbe:
    result: ProbeResult
    at: float  # wall clock


class _Reload(Exception):
    """Raised inside the probe group to restart it with a new config."""


class Watcher:
    def __init__(self, config: RouterConfig, *, mqtt: MqttLink | None, audit: AuditLog,
                 clock: Callable[[], float] = time.monotonic,
                 http: aiohttp.ClientSession | None = None,
                 wall_clock: Callable[[], float] = time.time):
        self._config = config
        self._mqtt = mqtt
        self._audit = audit
        self._clock = clock
        self._wall = wall_clock
        self._http = http
        self._machines = {fid: CentreHealth(fid, config.health, f.centre)
                          for fid, f in config.forces.items()}
        self._probes: dict[str, dict[str, _LastProbe]] = {fid: {} for fid in config.forces}
        self._invalid: dict[str, str] = {}  # force → last telemetry error, while in a bad streak
        self._snapshot = Snapshot({fid: m.view for fid, m in self._machines.items()})
        self._listeners: list[Listener] = []
        self._alerter = Alerter(config, mqtt, wall_clock)
        self._listeners.append(self._alerter.observe)
        self._wake = asyncio.Event()
        self._reload = asyncio.Event()
        self._broker_up = False
        self._lost_at: float | None = None  # when the broker went away (after a first connect)
        self._all_stale_since: float | None = None
        self._mode = EvidenceMode.PROBES_ONLY
        self._retained: dict[str, dict[str, Any]] = {}  # force → its last state message
        if mqtt is not None:
            mqtt.subscribe(TOPIC_PATTERN, self._on_telemetry)
            mqtt.add_connection_listener(self._on_connection)
        for fid in config.forces:
            self._export(fid)
        metrics.EVIDENCE_MODE.set(0)

    # ---- read side ----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def fail_static(self) -> bool:
        return self._mode is EvidenceMode.FAIL_STATIC

    @property
    def mode(self) -> EvidenceMode:
        return self._mode

    def evidence(self) -> dict[str, Any]:
        now = self._clock()
        until = None
        if self._mode is EvidenceMode.FAIL_STATIC and self._all_stale_since is not None:
            until = self._all_stale_since + self._config.health.fail_static_s - now
        return {"mode": self._mode.value, "broker_connected": self._broker_up,
                "fail_static_remaining_s": round(until, 3) if until is not None else None}

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def status(self) -> dict[str, dict[str, Any]]:
        now, wall = self._clock(), self._wall()
        out: dict[str, dict[str, Any]] = {}
        for fid, m in self._machines.items():
            age = m.telemetry_age(now)
            last = m.last_telemetry
            o = m.override
            out[fid] = {
                "state": m.state.value,
                "since": iso(wall - (now - m.since)),
                "reason": m.reason,
                "source": m.source,
                "telephony_up": m.component(Component.TELEPHONY),
                "cad_up": m.component(Component.CAD),
                "telemetry": None if last is None else {
                    "last": as_dict(last), "age_s": round(age or 0.0, 3),
                    "stale": m.fresh_telemetry(now) is None},
                "override": None if o is None else {
                    "state": o.state.value, "reason": o.reason, "source": o.source,
                    "declared_at": iso(wall - (now - o.declared_at)),
                    "expires_at": None if o.expires_at is None else
                    iso(wall + (o.expires_at - now))},
                "held_until": None if m.held_until is None else iso(wall + (m.held_until - now)),
                "probes": {pid: {"ok": p.result.ok, "outcome": p.result.outcome.value,
                                 "latency_s": round(p.result.latency_s, 4),
                                 "detail": p.result.detail, "at": iso(p.at)}
                           for pid, p in self._probes.get(fid, {}).items()},
                "evidence": self._mode.value,
            }
        return out

    # ---- manual declarations ------------------------------------------------------------

    def override(self, force: str, state: CentreState, reason: str, *,
                 expires_in_s: float | None, source: str) -> None:
        m = self._machines[force]  # KeyError for an unknown force: callers validate first
        now = self._clock()
        expires_at = None if expires_in_s is None else now + expires_in_s
        self._audit.record("declaration", force=force, before=m.state.value, after=state.value,
                           source=source, reason=reason, expires_in_s=expires_in_s)
        self._apply(force, m.declare(Override(state, reason, source, now, expires_at), now))

    def clear_override(self, force: str, *, source: str) -> bool:
        m = self._machines[force]
        if m.override is None:
            return False
        self._audit.record("clear", force=force, before=m.override.state.value, after="automatic",
                           source=source, reason=f"cleared: {m.override.reason}")
        self._apply(force, m.clear(self._clock()))
        return True

    def reconfigure(self, config: RouterConfig) -> None:
        """Swap in a reloaded config; forces that remain keep their evidence and state."""
        now = self._clock()
        self._config = config
        old = self._machines
        self._machines = {}
        for fid, f in config.forces.items():
            m = old.get(fid)
            if m is None:
                m = CentreHealth(fid, config.health, f.centre)
            self._machines[fid] = m
            self._probes.setdefault(fid, {})
        self._alerter.config = config
        self._retained = {f: m for f, m in self._retained.items() if f in config.forces}
        self._snapshot = Snapshot({fid: m.view for fid, m in self._machines.items()},
                                  self._snapshot.version + 1)
        for fid, f in config.forces.items():
            self._apply(fid, self._machines[fid].reconfigure(config.health, f.centre, now))
        self._reload.set()

    # ---- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Probes, housekeeping and alert delivery, until cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            session = self._http
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._alerter.run(session), name="alerts")
                tg.create_task(self._housekeeping(), name="health-housekeeping")
                tg.create_task(self._run_probes(session), name="probes")

    async def _run_probes(self, session: aiohttp.ClientSession) -> None:
        while True:
            self._reload.clear()
            try:
                async with asyncio.TaskGroup() as tg:
                    for fid, force in self._config.forces.items():
                        for probe in force.centre.probes:
                            tg.create_task(self._probe_loop(fid, probe, session),
                                           name=f"probe {fid} {probe_id(probe)}")
                    tg.create_task(self._until_reload())
            except* _Reload:
                log.info("probes restarted for the reloaded config")

    async def _until_reload(self) -> None:
        await self._reload.wait()
        raise _Reload

    async def _probe_loop(self, force: str, probe: Probe, session: aiohttp.ClientSession) -> None:
        health = self._config.health
        interval = probe.interval_s or health.interval_s
        timeout = probe.timeout_s or health.timeout_s
        pid = probe_id(probe)
        failures = FailureLog(f"{force} {pid}")
        latency = metrics.PROBE_SECONDS.labels(force, probe.kind)
        failed = metrics.PROBE_FAILURES.labels(force, probe.kind)
        next_at = time.monotonic() + random.uniform(0, interval)  # spread the first round
        while True:
            await asyncio.sleep(max(next_at - time.monotonic(), 0.0))
            # fixed rate with jitter (Envoy): a slow probe does not push the next one back
            next_at = max(next_at + interval * (1 + random.uniform(-health.jitter, health.jitter)),
                          time.monotonic())
            result = await run_probe(probe, timeout, session)
            latency.observe(result.latency_s)
            if not result.ok:
                failed.inc()
            failures.record(result)
            self._probes[force][pid] = _LastProbe(result, self._wall())
            machine = self._machines.get(force)
            if machine is not None:
                detail = f"{result.outcome.value} ({result.detail})"
                self._apply(force, machine.probe_result(pid, result.ok, self._clock(), detail))

    async def _housekeeping(self) -> None:
        """Expiries (overrides, telemetry, holds, ramps) and the evidence mode, on deadlines."""
        while True:
            now = self._clock()
            self._update_mode(now)
            freeze = self._lost_at if self._mode is not EvidenceMode.PROBES_ONLY else None
            for fid, m in list(self._machines.items()):
                had = m.override
                transition = m.tick(now, freeze_telemetry_at=freeze)
                if had is not None and m.override is None:
                    self._audit.record("expiry", force=fid, before=had.state.value,
                                       after="automatic", source=had.source,
                                       reason=f"expired: {had.reason}")
                self._apply(fid, transition)
            deadlines = [d for m in self._machines.values()
                         if (d := m.next_deadline(now)) is not None]
            if self._mode is EvidenceMode.FAIL_STATIC and self._all_stale_since is not None:
                deadlines.append(self._all_stale_since + self._config.health.fail_static_s)
            wait = min(min(deadlines, default=now + MAX_IDLE_S) - now, MAX_IDLE_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await self._wake.wait()

    def _update_mode(self, now: float) -> None:
        max_age = self._config.health.telemetry_max_age_s
        feeds = [m for fid, m in self._machines.items()
                 if self._config.forces[fid].centre.telemetry]
        if self._mqtt is None or not feeds:
            mode = EvidenceMode.PROBES_ONLY
        elif self._broker_up:
            mode = EvidenceMode.LIVE
        elif self._lost_at is None:
            mode = EvidenceMode.PROBES_ONLY  # the broker was never reached
        elif not all((a := m.telemetry_age(now)) is None or a > max_age for m in feeds):
            mode, self._all_stale_since = EvidenceMode.LIVE, None
        else:
            if self._all_stale_since is None:
                self._all_stale_since = now
            fresh = now < self._all_stale_since + self._config.health.fail_static_s
            mode = EvidenceMode.FAIL_STATIC if fresh else EvidenceMode.PROBES_ONLY
        if mode is not self._mode:
            level = logging.INFO if mode is EvidenceMode.LIVE else logging.WARNING
            log.log(level, "evidence: %s -> %s", self._mode.value, mode.value)
            self._mode = mode
            metrics.EVIDENCE_MODE.set(1 if mode is EvidenceMode.FAIL_STATIC else 0)

    def _on_connection(self, up: bool) -> None:
        self._broker_up = up
        if up:
            self._lost_at, self._all_stale_since = None, None
            # a restarted broker without persistence, or a new one after a reload, has lost
            # the retained states: partners and dashboards read them on subscribing
            assert self._mqtt is not None
            for force, message in self._retained.items():
                self._mqtt.publish(f"state/{force}", message, retain=True, qos=1)
        else:
            self._lost_at = self._clock()
        self._wake.set()

    # ---- telemetry ----------------------------------------------------------------------

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        """Runs on every message: never raises, counts every outcome."""
        force = force_of(topic)
        m = self._machines.get(force or "")
        if force is None or m is None:
            metrics.TELEMETRY_MESSAGES.labels("unknown", "unknown_force").inc()
            return
        if not self._config.forces[force].centre.telemetry:
            metrics.TELEMETRY_MESSAGES.labels(force, "ignored").inc()
            return
        try:
            reading = parse_telemetry(payload)
        except TelemetryError as exc:
            metrics.TELEMETRY_MESSAGES.labels(force, "invalid").inc()
            if force not in self._invalid:  # once per bad streak, not per message
                log.warning("%s: invalid telemetry: %s", force, exc)
            self._invalid[force] = str(exc)
            return
        if self._invalid.pop(force, None) is not None:
            log.info("%s: telemetry valid again", force)
        now, age = self._clock(), reading.age_s(self._wall())
        if age > self._config.health.telemetry_max_age_s:
            metrics.TELEMETRY_MESSAGES.labels(force, "stale").inc()
            return  # treated as missing (e.g. an old retained message)
        metrics.TELEMETRY_MESSAGES.labels(force, "accepted").inc()
        self._apply(force, m.telemetry(reading, now - age, now))
        self._wake.set()  # a new staleness deadline

    # ---- applying a change --------------------------------------------------------------

    def _apply(self, force: str, transition: Transition | None) -> None:
        m = self._machines.get(force)
        if m is None:
            return
        if transition is not None:
            self._record(transition)
            self._wake.set()  # holds and ramps bring new deadlines
        if self._snapshot.centres.get(force) == m.view:
            return
        self._snapshot = self._snapshot.with_centre(force, m.view)  # one atomic swap
        self._export(force)
        snapshot = self._snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:  # one listener's bug must not stop health watching
                log.exception("snapshot listener %r failed", listener)

    def _record(self, t: Transition) -> None:
        level = logging.WARNING if t.after is CentreState.DOWN else logging.INFO
        log.log(level, "%s: %s -> %s (%s: %s)", t.force, t.before.value, t.after.value,
                t.source, t.reason)
        self._audit.record("state_change", force=t.force, before=t.before.value,
                           after=t.after.value, source=t.source, reason=t.reason)
        metrics.STATE_CHANGES.labels(t.force, t.after.value, t.source.split(":")[0]).inc()
        if t.detection_s is not None:
            metrics.FAILOVER_DETECTION_SECONDS.observe(t.detection_s)
        if self._mqtt is not None:
            since = iso(self._wall() - (self._clock() - t.at))
            message = {"state": t.after.value, "since": since, "reason": t.reason,
                       "source": t.source}
            self._retained[t.force] = message
            self._mqtt.publish(f"state/{t.force}", message, retain=True, qos=1)

    def _export(self, force: str) -> None:
        m = self._machines[force]
        for state in metrics.STATES:
            metrics.CENTRE_STATE.labels(force, state).set(1 if m.state.value == state else 0)
        for component in Component:
            up = m.component(component)
            metrics.CENTRE_COMPONENT_UP.labels(force, component.value).set(1 if up else 0)
