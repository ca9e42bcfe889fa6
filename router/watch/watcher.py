"""The owner of live health: probes, telemetry and declarations in, one immutable `Snapshot` out.

Every centre's probes (router/watch/prober.py), the telemetry subscription and managers'
declarations feed that centre's `CentreHealth` machine. After each change the watcher builds a
new `Snapshot` and swaps it in with one assignment, so a routing decision reads either the old
state or the new, never half of each. Each state change is audited and logged here; listeners
hear of new snapshots and of transitions (the publisher, Prometheus' exporter, the handoff
desk) and are given the function that unsubscribes them. How far evidence can be trusted
(live, fail static, probes only) is router/watch/evidence.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import aiohttp

from router.config import RouterConfig
from router.engine.model import CentreState, CentreView, Snapshot
from router.infra import metrics
from router.infra.audit import AuditLog
from router.infra.listeners import Listeners, Unsubscribe
from router.infra.mqtt_link import MqttLink
from router.watch.evidence import Evidence, EvidenceMode
from router.watch.health import CentreHealth, Component, Override, Transition
from router.watch.outliers import Outcome, Outliers
from router.watch.prober import Prober
from router.watch.probes import ProbeResult
from router.watch.status import centre_status
from router.watch.telemetry import TOPIC_PATTERN, TelemetryError, force_of, parse_telemetry

log = logging.getLogger(__name__)

MAX_IDLE_S = 1.0  # housekeeping runs at least this often even with no deadline due


class Watcher:
    def __init__(self, config: RouterConfig, *, mqtt: MqttLink | None, audit: AuditLog,
                 clock: Callable[[], float] = time.monotonic,
                 http: aiohttp.ClientSession | None = None,
                 wall_clock: Callable[[], float] = time.time):
        self._config = config
        self._audit = audit
        self._clock = clock
        self._wall = wall_clock
        self._http = http
        self._machines = {fid: CentreHealth(fid, config.health, f.centre)
                          for fid, f in config.forces.items()}
        # last known states from before a restart, standing in for centres with no evidence
        # yet until `_recall_until` (router/watch/keeper.py)
        self._recalled: dict[str, CentreView] = {}
        self._recall_until = 0.0
        self._invalid: dict[str, str] = {}  # force → last telemetry error, while in a bad streak
        self._snapshot = Snapshot({fid: m.view for fid, m in self._machines.items()})
        self._snapshots: Listeners[Snapshot] = Listeners()
        self._transitions: Listeners[Transition] = Listeners()
        self._prober = Prober(config, self._on_probe, wall_clock, partial(_edge, self))
        self._outliers = Outliers(config.health.outlier_detection)
        self._evidence = Evidence(config.health, has_broker=mqtt is not None)
        self._wake = asyncio.Event()
        if mqtt is not None:
            mqtt.subscribe(TOPIC_PATTERN, self._on_telemetry)
            mqtt.add_connection_listener(self._on_connection)

    # ---- read side ----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def fail_static(self) -> bool:
        return self._evidence.mode is EvidenceMode.FAIL_STATIC

    @property
    def mode(self) -> EvidenceMode:
        return self._evidence.mode

    def evidence(self) -> dict[str, Any]:
        return self._evidence.as_json(self._clock())

    def add_listener(self, callback: Callable[[Snapshot], None]) -> Unsubscribe:
        """Called with every new snapshot; never awaits."""
        return self._snapshots.add(callback)

    def add_transition_listener(self, callback: Callable[[Transition], None]) -> Unsubscribe:
        """Called with every change of a centre's state, after it is audited."""
        return self._transitions.add(callback)

    def component(self, force: str, component: Component) -> bool | None:
        """A component's last verdict: None while there is no evidence."""
        m = self._machines.get(force)
        return None if m is None else m.component(component)

    def wall_time(self, moment: float) -> float:
        """A moment on the watcher's clock (transitions, `since`) in epoch seconds."""
        return self._wall() - (self._clock() - moment)

    def status(self) -> dict[str, dict[str, Any]]:
        now, wall = self._clock(), self._wall()
        return {fid: centre_status(m, self._prober.last.get(fid, {}), self._evidence.mode,
                                   now, wall)
                for fid, m in self._machines.items()}

    # ---- manual declarations ------------------------------------------------------------

    def override(self, force: str, state: CentreState, reason: str, *,
                 expires_in_s: float | None, source: str, token: str | None = None) -> None:
        """A manager's declaration; `source` names who made it, `token` what they used."""
        m = self._machines[force]  # KeyError for an unknown force: callers validate first
        now = self._clock()
        expires_at = None if expires_in_s is None else now + expires_in_s
        self._audit.record("declaration", force=force, before=m.state.value, after=state.value,
                           source=source, reason=reason, expires_in_s=expires_in_s,
                           token=token)
        self._apply(force, m.declare(Override(state, reason, source, now, expires_at), now))

    def overrides(self) -> dict[str, Override]:
        """The declarations standing now, by force."""
        return {fid: m.override for fid, m in self._machines.items() if m.override is not None}

    def restore_override(self, force: str, override: Override | None) -> None:
        """Put back a declaration made before a restart or on another router (or its end),
        as it was made: audited where it was made, so only logged here."""
        m = self._machines.get(force)
        if m is None or _same(m.override, override):
            return
        now = self._clock()
        log.info("%s: declaration %s (%s)", force,
                 f"{override.state.value} by {override.source} restored" if override
                 else "ended elsewhere", override.reason if override else "")
        self._apply(force, m.declare(override, now) if override else m.clear(now))

    def recall(self, views: dict[str, CentreView], for_s: float) -> None:
        """Let centres' last known states stand, while each has no evidence of its own yet,
        for at most `for_s`: right after a start, partners that were fine a moment ago still
        take calls instead of a declared-down centre getting them as a last resort."""
        self._recalled = dict(views)
        self._recall_until = self._clock() + for_s
        for fid in views:
            self._apply(fid, None)
        self._wake.set()

    def _view(self, fid: str, m: CentreHealth) -> CentreView:
        recalled = self._recalled.get(fid)
        if (recalled is not None and m.state is CentreState.UNKNOWN and m.source == "startup"
                and m.override is None and self._clock() < self._recall_until):
            return recalled
        return m.view

    def clear_override(self, force: str, *, source: str, token: str | None = None) -> bool:
        m = self._machines[force]
        if m.override is None:
            return False
        self._audit.record("clear", force=force, before=m.override.state.value, after="automatic",
                           source=source, reason=f"cleared: {m.override.reason}", token=token)
        self._apply(force, m.clear(self._clock()))
        return True

    def reconfigure(self, config: RouterConfig) -> None:
        """Swap in a reloaded config; forces that remain keep their evidence and state."""
        now = self._clock()
        self._config = config
        old = self._machines
        self._machines = {fid: old.get(fid) or CentreHealth(fid, config.health, f.centre)
                          for fid, f in config.forces.items()}
        self._evidence.health = config.health
        self._snapshot = Snapshot({fid: m.view for fid, m in self._machines.items()},
                                  self._snapshot.version + 1)
        for fid, f in config.forces.items():
            self._apply(fid, self._machines[fid].reconfigure(config.health, f.centre, now))
        self._prober.reconfigure(config)

    # ---- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Probes and housekeeping, until cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            session = self._http
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._housekeeping(), name="health-housekeeping")
                tg.create_task(self._prober.run(session), name="probes")

    def call_outcome(self, force: str, outcome: Outcome) -> None:
        """How a call ended at its centre: failures eject it (router/watch/outliers.py)."""
        _judge(self, force, outcome)

    def _on_probe(self, force: str, pid: str, result: ProbeResult) -> None:
        machine = self._machines.get(force)
        if machine is not None and pid in machine.probe_ids:
            detail = f"{result.outcome.value} ({result.detail})"
            self._apply(force, machine.probe_result(pid, result.ok, self._clock(), detail))

    async def _housekeeping(self) -> None:
        """Expiries (overrides, telemetry, holds, ramps) and the evidence mode, on deadlines."""
        while True:
            now = self._clock()
            self._update_mode(now)
            freeze = self._evidence.freeze_telemetry_at
            for fid, m in list(self._machines.items()):
                had = m.override
                transition = m.tick(now, freeze_telemetry_at=freeze)
                if had is not None and m.override is None:
                    self._audit.record("expiry", force=fid, before=had.state.value,
                                       after="automatic", source=had.source,
                                       reason=f"expired: {had.reason}")
                self._apply(fid, transition)
            if self._recalled and now >= self._recall_until:  # evidence of their own from now
                recalled, self._recalled = self._recalled, {}
                for fid in recalled:
                    self._apply(fid, None)
            deadlines = [d for m in self._machines.values()
                         if (d := m.next_deadline(now)) is not None]
            if self._recalled:
                deadlines.append(self._recall_until)
            if (until := self._evidence.deadline()) is not None:
                deadlines.append(until)
            wait = min(min(deadlines, default=now + MAX_IDLE_S) - now, MAX_IDLE_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await self._wake.wait()

    def _update_mode(self, now: float) -> None:
        feeds = (m.telemetry_age(now) for fid, m in self._machines.items()
                 if self._config.forces[fid].centre.telemetry)
        self._evidence.update(now, feeds)

    def _on_connection(self, up: bool) -> None:
        self._evidence.connection(up, self._clock())
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
        view = self._view(force, m)
        if self._snapshot.centres.get(force) == view:
            return
        self._snapshot = self._snapshot.with_centre(force, view)  # one atomic swap
        self._snapshots.notify(self._snapshot)

    def _record(self, t: Transition) -> None:
        level = logging.WARNING if t.after is CentreState.DOWN else logging.INFO
        log.log(level, "%s: %s -> %s (%s: %s)", t.force, t.before.value, t.after.value,
                t.source, t.reason)
        self._audit.record("state_change", force=t.force, before=t.before.value,
                           after=t.after.value, source=t.source, reason=t.reason)
        self._transitions.notify(t)


def _judge(w: Watcher, force: str, outcome: Outcome) -> None:
    """A call's outcome through outlier detection (at the running settings), counted and
    logged; an ejection goes to the centre's machine as its telephony down."""
    machine, now, outliers = w._machines.get(force), w._clock(), w._outliers
    if machine is None:
        return
    metrics.CALL_OUTCOMES.labels(force, outcome.value).inc()
    outliers.reconfigure(w._config.health.outlier_detection)
    capped = outliers.capped
    ejection = outliers.record(force, outcome, now, len(w._machines))
    if outliers.capped > capped:
        log.warning("%s: calls failing, but max_ejection_percent allows no more ejected "
                    "centres now", force)
    if ejection is not None:
        metrics.OUTLIER_EJECTIONS.labels(force).inc()
        log.warning("%s: %s", force, ejection.reason)
        w._apply(force, machine.eject(ejection.until, ejection.reason, now))


def _edge(w: Watcher, force: str, pid: str) -> float | None:
    """The prober's question: is this probe on an edge, to be confirmed quickly?"""
    machine = w._machines.get(force)
    return None if machine is None else machine.edge_interval(pid)


def _same(a: Override | None, b: Override | None) -> bool:
    """The same declaration, its times read back through the wall clock (to within 1 s)."""
    if a is None or b is None:
        return a is b
    return ((a.state, a.reason, a.source) == (b.state, b.reason, b.source)
            and (a.expires_at is None) == (b.expires_at is None)
            and abs((a.expires_at or 0.0) - (b.expires_at or 0.0)) < 1.0)
