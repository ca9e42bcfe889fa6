"""Prometheus' view of the centres: one gauge per state, each component up or down, every
transition counted and, when evidence caused a `down`, how long detection took. At each scrape,
the board: capacity, headroom, aid, queues, declarations, and whether and why each force
diverts, as the routing rules say (never recomputed here), so Grafana can rebuild the board."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from router.engine.calls import CallDesk
from router.engine.model import CentreState, Service, Snapshot
from router.engine.rules import Cause
from router.infra import metrics
from router.watch.health import Component, Transition
from router.watch.watcher import Watcher

STATES = tuple(s.value for s in CentreState)
DECLARABLE = tuple(s.value for s in CentreState if s is not CentreState.UNKNOWN)
LIMITS = ("handlers_on_duty", "overflow_queue", "max_queue")


class StateMetrics:
    """Listens for the watcher's whole life: Prometheus is scraped for as long as it runs."""

    def __init__(self, watcher: Watcher, calls: CallDesk,
                 wall_clock: Callable[[], float] = time.time):
        self._watcher = watcher
        self._calls = calls
        self._wall = wall_clock
        self._forces: set[str] = set()
        watcher.add_listener(self._on_snapshot)
        watcher.add_transition_listener(self._on_transition)
        self._on_snapshot(watcher.snapshot)
        metrics.BOARD.bind(self.board)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        for gone in self._forces - snapshot.centres.keys():  # removed by a reload
            for state in STATES:
                metrics.CENTRE_STATE.remove(gone, state)
            for component in Component:
                metrics.CENTRE_COMPONENT_UP.remove(gone, component.value)
        self._forces = set(snapshot.centres)
        for force, view in snapshot.centres.items():
            for state in STATES:
                metrics.CENTRE_STATE.labels(force, state).set(
                    1 if view.state.value == state else 0)
            for component in Component:
                up = self._watcher.component(force, component)
                metrics.CENTRE_COMPONENT_UP.labels(force, component.value).set(1 if up else 0)

    @staticmethod
    def _on_transition(t: Transition) -> None:
        metrics.STATE_CHANGES.labels(t.force, t.after.value, t.source.split(":")[0]).inc()
        if t.detection_s is not None:
            metrics.FAILOVER_DETECTION_SECONDS.labels(t.force).observe(t.detection_s)

    def board(self) -> dict[metrics.BoardGauge, list[metrics.Sample]]:
        """Every board gauge now, from one snapshot and the rules that route with it."""
        out: dict[metrics.BoardGauge, list[metrics.Sample]] = defaultdict(list)
        snapshot = self._watcher.snapshot
        status = self._watcher.status()
        rules = self._calls.policy.rules
        ledger = self._calls.ledger
        diversions = self._calls.diversions(snapshot)
        wall = self._wall()
        for fid, force in rules.forces.items():
            view = snapshot.get(fid)
            limits = (force.handlers, force.overflow_queue, force.max_queue)
            out[metrics.CENTRE_CAPACITY] += [((fid, k), v) for k, v in zip(LIMITS, limits,
                                                                            strict=True)]
            load = self._calls.load(fid)
            headroom = rules.headroom(fid, ledger)
            for s in Service:
                out[metrics.CALLS_IN_FLIGHT_BY_SERVICE].append(
                    ((fid, s.value), load[f"in_flight_{s.value}"]))
                out[metrics.AID_CAP].append(((fid, s.value), force.aid_cap[s]))
                out[metrics.AID_HEADROOM].append(((fid, s.value), headroom[s]))
            out[metrics.AID_IN_FLIGHT].append(((fid,), load["aid"]))
            out[metrics.CALLS_WAITING].append(((fid,), max(rules.queue(force, view, ledger), 0)))
            self._telemetry(out, fid, status.get(fid, {}))
            self._override(out, fid, status.get(fid, {}).get("override"), wall)
            home = diversions[fid]
            out[metrics.DIVERTING].append(((fid,), 1 if home.diverting else 0))
            out[metrics.SHARE_DIVERTED].append(((fid,), round(1.0 - home.share, 4)))
            out[metrics.DIVERSION_CAUSE] += [((fid, c.value), 1 if home.cause is c else 0)
                                             for c in Cause]
        for origin, services in self._calls.routing_table(snapshot).items():
            for service, shares in services.items():
                out[metrics.ROUTING_SHARE] += [
                    ((origin, service, s["destination"], s["reason"]), s["share"])
                    for s in shares]
        return out

    @staticmethod
    def _telemetry(out: dict[metrics.BoardGauge, list[metrics.Sample]], fid: str,
                   status: dict[str, Any]) -> None:
        telemetry = status.get("telemetry")
        if telemetry is None:
            return
        out[metrics.TELEMETRY_AGE_SECONDS].append(((fid,), telemetry["age_s"]))
        if telemetry["stale"]:  # stale never reads as the centre's present
            return
        last = telemetry["last"]
        if last.get("oldest_wait_s") is not None:
            out[metrics.OLDEST_WAIT_SECONDS].append(((fid,), last["oldest_wait_s"]))
        if last.get("handlers_available") is not None:
            out[metrics.HANDLERS_AVAILABLE].append(((fid,), last["handlers_available"]))

    @staticmethod
    def _override(out: dict[metrics.BoardGauge, list[metrics.Sample]], fid: str,
                  override: dict[str, Any] | None, wall: float) -> None:
        declared = None if override is None else override["state"]
        out[metrics.OVERRIDE_ACTIVE] += [((fid, s), 1 if s == declared else 0)
                                         for s in DECLARABLE]
        if override is not None:
            since = datetime.fromisoformat(override["declared_at"]).timestamp()
            out[metrics.OVERRIDE_AGE_SECONDS].append(((fid,), max(wall - since, 0.0)))
