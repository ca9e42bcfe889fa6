"""Whoever subscribes can always let go: every listener registration returns its unsubscribe."""

from __future__ import annotations

from pathlib import Path

import pytest
from health_support import make_config

from router.engine.model import CentreState, Snapshot
from router.infra.audit import AuditLog
from router.infra.listeners import Listeners
from router.infra.mqtt_link import MqttLink
from router.watch.health import Transition
from router.watch.watcher import Watcher


def test_unsubscribe_stops_calls_and_one_bad_listener_hurts_no_other(
        caplog: pytest.LogCaptureFixture) -> None:
    heard: list[int] = []
    listeners: Listeners[int] = Listeners()

    def broken(_: int) -> None:
        raise RuntimeError("listener bug")

    listeners.add(broken)
    unsubscribe = listeners.add(heard.append)
    listeners.notify(1)
    unsubscribe()
    unsubscribe()  # twice is harmless
    listeners.notify(2)
    assert heard == [1]
    assert "listener bug" in caplog.text


def test_watcher_listeners_can_let_go(tmp_path: Path) -> None:
    config = make_config(telemetry=False)
    watcher = Watcher(config, mqtt=None, audit=AuditLog(tmp_path / "audit.jsonl"))
    snapshots: list[Snapshot] = []
    transitions: list[Transition] = []
    stop_snapshots = watcher.add_listener(snapshots.append)
    stop_transitions = watcher.add_transition_listener(transitions.append)
    watcher.override("met", CentreState.DOWN, "fire", expires_in_s=None, source="manager:T")
    assert [t.after for t in transitions] == [CentreState.DOWN] and len(snapshots) == 1
    stop_snapshots()
    stop_transitions()
    watcher.clear_override("met", source="manager:T")
    assert len(transitions) == 1 and len(snapshots) == 1


def test_mqtt_handlers_and_connection_listeners_can_let_go() -> None:
    config = make_config(telemetry=False)
    link = MqttLink(config.mqtt)
    seen: list[bool] = []
    stop = link.add_connection_listener(seen.append)
    link._set_connected(True)
    stop()
    link._set_connected(False)
    assert seen == [True]
    unsubscribe = link.subscribe("centres/+/telemetry", lambda topic, payload: None)
    assert len(link._handlers) == 1
    unsubscribe()
    assert link._handlers == []
