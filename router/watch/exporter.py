"""Prometheus' view of the centres: one gauge per state, each component up or down, every
transition counted and, when evidence caused a `down`, how long detection took."""

from __future__ import annotations

from router.engine.model import CentreState, Snapshot
from router.infra import metrics
from router.watch.health import Component, Transition
from router.watch.watcher import Watcher

STATES = tuple(s.value for s in CentreState)


class StateMetrics:
    """Listens for the watcher's whole life: Prometheus is scraped for as long as it runs."""

    def __init__(self, watcher: Watcher):
        self._watcher = watcher
        watcher.add_listener(self._on_snapshot)
        watcher.add_transition_listener(self._on_transition)
        self._on_snapshot(watcher.snapshot)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        for force, view in snapshot.centres.items():
            for state in STATES:
                metrics.child(metrics.CENTRE_STATE, force, state).set(
                    1 if view.state.value == state else 0)
            for component in Component:
                up = self._watcher.component(force, component)
                metrics.child(metrics.CENTRE_COMPONENT_UP, force, component.value).set(
                    1 if up else 0)

    @staticmethod
    def _on_transition(t: Transition) -> None:
        metrics.STATE_CHANGES.labels(t.force, t.after.value, t.source.split(":")[0]).inc()
        if t.detection_s is not None:
            metrics.FAILOVER_DETECTION_SECONDS.observe(t.detection_s)
