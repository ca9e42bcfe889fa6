"""The live watcher against real components: an aiohttp health server, a UDP SIP responder,
a private Mosquitto (killed and restarted mid-test), telemetry published with aiomqtt."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from aiohttp import web
from conftest import Broker, free_port
from health_support import make_config
from test_probes import HealthServer, SipResponder, serving_health

from router.config import RouterConfig
from router.engine.calls import CallDesk
from router.engine.ledger import Ledger
from router.engine.model import CentreState, Reason, Service, Snapshot
from router.engine.policy import Policy
from router.infra import metrics
from router.infra.audit import AuditLog, read_audit
from router.infra.mqtt_link import MqttLink
from router.watch.evidence import EvidenceMode
from router.watch.publisher import Publisher
from router.watch.watcher import Watcher

S = CentreState
FAST = {"interval_s": 0.05, "timeout_s": 0.1, "jitter": 0.1, "unhealthy_threshold": 2,
        "healthy_threshold": 2, "telemetry_max_age_s": 0.8, "fail_static_s": 1.0,
        "recovery": {"ramp": [0.5, 1.0], "step_s": 0.6},
        "flap_damping": {"window_s": 4.0, "max_transitions": 2, "hold_s": 1.0,
                         "max_hold_s": 4.0}}


async def wait_until(predicate: Callable[[], bool], within: float = 5.0,
                     what: str = "condition") -> float:
    """Poll until true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=5)
        for task in pending:
            task.print_stack()
        assert not pending, "a task ignored its cancellation"
        for task in tasks:
            assert task.cancelled() or task.exception() is None


@pytest.fixture
async def sip() -> AsyncIterator[tuple[SipResponder, str]]:
    port = free_port(socket.SOCK_DGRAM)
    transport, responder = await asyncio.get_running_loop().create_datagram_endpoint(
        SipResponder, local_addr=("127.0.0.1", port))
    try:
        yield responder, f"127.0.0.1:{port}"
    finally:
        transport.close()


cad = pytest.fixture(serving_health, name="cad")
partners = pytest.fixture(serving_health, name="partners")  # every other force's centre


def met_probes(sip_target: str, cad_url: str | None = None,
               partners_url: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Met: SIP for telephony (+ HTTP for CAD); every other force, when given, one HTTP
    telephony probe so it counts as a healthy partner."""
    probes = [{"kind": "sip", "target": sip_target, "component": "telephony"}]
    if cad_url:
        probes.append({"kind": "http", "target": cad_url, "component": "cad"})
    out = {"met": probes}
    if partners_url:
        for fid in make_config().forces:
            if fid != "met":
                out[fid] = [{"kind": "http", "target": partners_url, "component": "telephony"}]
    return out


def state(w: Watcher, force: str) -> CentreState:
    return w.snapshot.get(force).state


def telemetry(**over: Any) -> bytes:
    return json.dumps({"ts": time.time(), "telephony_up": True, "cad_up": True,
                       "calls_waiting": 0, "handlers_available": 5, "handlers_on_duty": 40,
                       "oldest_wait_s": 0.0, **over}).encode()


def counter(force: str, outcome: str) -> float:
    value = metrics.TELEMETRY_MESSAGES.labels(force, outcome)._value.get()
    return float(value)


async def test_probes_fail_over_and_recover_by_the_ramp(
        tmp_path: Path, sip: tuple[SipResponder, str], cad: HealthServer,
        partners: HealthServer) -> None:
    responder, target = sip
    notified: list[dict[str, Any]] = []

    async def notify(request: web.Request) -> web.Response:
        notified.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/notify", notify)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = make_config(FAST, probes=met_probes(target, cad.url, partners.url), telemetry=False,
                         notify={"kent": f"http://127.0.0.1:{port}/notify"})
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=None, audit=audit)
    policy, ledger = Policy(config), Ledger()
    snapshots: list[Snapshot] = []
    watcher.add_listener(snapshots.append)
    publisher = Publisher(config, watcher=watcher, calls=CallDesk(config), mqtt=None)
    try:
        async with aiohttp.ClientSession() as session, \
                running(watcher.run(), publisher.run(session)):
            await wait_until(lambda: all(v.state is S.NORMAL
                                         for v in watcher.snapshot.centres.values()),
                             what="all normal")
            assert watcher.mode is EvidenceMode.PROBES_ONLY and not watcher.fail_static
            call = policy.decide(Service.EMERGENCY, "met", watcher.snapshot, ledger,
                                 time.monotonic())
            assert call.destination == "met"

            responder.answering = False
            took = await wait_until(lambda: state(watcher, "met") is S.DOWN, what="met down")
            h = config.health
            assert took < h.unhealthy_threshold * (h.interval_s * 1.2 + h.timeout_s) + 0.5
            call = policy.decide(Service.EMERGENCY, "met", watcher.snapshot, ledger,
                                 time.monotonic())
            assert call.destination != "met" and call.reason is Reason.ORIGIN_DOWN

            cad.status = 503
            await wait_until(lambda: not watcher.snapshot.get("met").cad_up, what="cad down")
            status = watcher.status()["met"]
            assert status["cad_up"] is False and status["telephony_up"] is False
            assert any(p["outcome"] == "bad_answer" for p in status["probes"].values())

            cad.status = 200  # met's CAD down would overflow everything (on_cad_down: overflow)
            await wait_until(lambda: watcher.snapshot.get("met").cad_up, what="cad up")
            responder.answering = True
            await wait_until(lambda: state(watcher, "met") is S.RECOVERING, what="recovering")
            view = watcher.snapshot.get("met")
            plan = policy.plan(Service.EMERGENCY, "met", watcher.snapshot, ledger, view.since)
            assert plan[0].destination == "met" and plan[0].share == h.recovery.ramp[0]
            ramp_s = (len(h.recovery.ramp) - 1) * h.recovery.step_s
            took = await wait_until(lambda: state(watcher, "met") is S.NORMAL, what="normal")
            assert took >= ramp_s - 0.1  # not before the ramp completes
            await wait_until(lambda: len(notified) >= 3, what="alerts to kent")
    finally:
        audit.close()
        await runner.cleanup()
    # every snapshot is a new object: listeners never saw one mutated under them
    assert len({id(s) for s in snapshots}) == len(snapshots)
    assert [s.version for s in snapshots] == sorted(s.version for s in snapshots)
    changes = [(r["from"], r["to"], r["source"]) for r in read_audit(tmp_path / "audit.jsonl")
               if r["force"] == "met"]
    assert changes == [("unknown", "normal", "probe"), ("normal", "down", "probe"),
                       ("down", "recovering", "probe"), ("recovering", "normal", "recovery")]
    events = [(n["origin"], n["event"], n["reason"]) for n in notified]
    assert events[:3] == [("met", "started", "origin_down"),
                          ("met", "changed", "origin_recovering"), ("met", "stopped", None)]


async def test_telemetry_over_a_real_broker(tmp_path: Path, broker: Broker,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.watch.watcher")
    config = make_config(FAST, mqtt_port=broker.port)
    link = MqttLink(config.mqtt)
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=link, audit=audit)
    Publisher(config, watcher=watcher, calls=CallDesk(config), mqtt=link)
    topic = "overflow/centres/kent/telemetry"
    levels = config.forces["kent"].centre.overload
    assert levels is not None and levels.enter.calls_waiting is not None
    try:
        async with running(link.run(), watcher.run()), \
                aiomqtt.Client(broker.host, broker.port, timeout=5) as pub:
            await wait_until(lambda: link.connected, what="link connected")
            await asyncio.sleep(0.1)  # the subscription is made right after the connect
            await pub.publish(topic, telemetry())
            await wait_until(lambda: state(watcher, "kent") is S.NORMAL, what="kent normal")
            assert watcher.mode is EvidenceMode.LIVE

            sent = time.monotonic()
            await pub.publish(topic, telemetry(telephony_up=False))
            await wait_until(lambda: state(watcher, "kent") is S.DOWN, what="kent down")
            assert time.monotonic() - sent < 0.5  # immediate evidence, no threshold

            bad_before = counter("kent", "invalid")
            stale_before = counter("kent", "stale")
            for payload in (b"{oops", b"[]", json.dumps({"ts": time.time()}).encode(),
                            telemetry(calls_waiting=-3)):
                await pub.publish(topic, payload)
            await pub.publish(topic, telemetry(ts=time.time() - 60))  # stale: missing
            await pub.publish("overflow/centres/atlantis/telemetry", telemetry())
            await pub.publish(topic, telemetry(calls_waiting=levels.enter.calls_waiting))
            await wait_until(lambda: state(watcher, "kent") is S.RECOVERING,
                             what="loop alive after bad payloads")
            assert counter("kent", "invalid") - bad_before == 4
            logged = [r.getMessage() for r in caplog.records if "telemetry" in r.getMessage()]
            assert len([m for m in logged if "invalid telemetry" in m]) == 1, logged
            assert any("telemetry valid again" in m for m in logged)
            assert counter("kent", "stale") - stale_before == 1
            assert watcher.snapshot.get("kent").calls_waiting == levels.enter.calls_waiting

            # the feed stops: stale telemetry is missing, never "healthy"
            await wait_until(lambda: state(watcher, "kent") is S.UNKNOWN, within=3,
                             what="stale telemetry dropped")
            status = watcher.status()["kent"]
            assert status["telemetry"]["stale"] and status["telemetry"]["age_s"] > 0.8
            assert watcher.snapshot.get("kent").calls_waiting is None
            await wait_until(lambda: link.pending == 0, what="the last state sent")

        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as sub:
            await sub.subscribe("overflow/state/kent")
            async with asyncio.timeout(3):
                message = await anext(aiter(sub.messages))
            assert message.retain
            assert json.loads(bytes(message.payload))["state"] == "unknown"
    finally:
        audit.close()


async def test_broker_killed_and_restarted_while_probes_keep_routing_right(
        tmp_path: Path, broker: Broker, sip: tuple[SipResponder, str]) -> None:
    responder, target = sip
    config = make_config(FAST, probes=met_probes(target), mqtt_port=broker.port)
    link = MqttLink(config.mqtt, backoff_max_s=0.5)
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=link, audit=audit)
    Publisher(config, watcher=watcher, calls=CallDesk(config), mqtt=link)
    policy, ledger = Policy(config), Ledger()
    levels = config.forces["kent"].centre.overload
    assert levels is not None and levels.enter.calls_waiting is not None
    try:
        async with running(link.run(), watcher.run()):
            await wait_until(lambda: link.connected, what="link connected")
            await asyncio.sleep(0.1)
            async with aiomqtt.Client(broker.host, broker.port, timeout=5) as pub:
                await pub.publish("overflow/centres/kent/telemetry",
                                  telemetry(calls_waiting=levels.enter.calls_waiting))
            await wait_until(lambda: state(watcher, "kent") is S.OVERLOADED, what="overloaded")
            await wait_until(lambda: state(watcher, "met") is S.NORMAL, what="met normal")

            broker.stop()
            await wait_until(lambda: not link.connected, what="link notices the loss")
            responder.answering = False  # probes need no broker
            await wait_until(lambda: state(watcher, "met") is S.DOWN, what="met down")
            decision = policy.decide(Service.EMERGENCY, "met", watcher.snapshot, ledger,
                                     time.monotonic())
            assert decision.destination != "met"
            assert link.pending >= 1  # met's state change waits for the broker

            await wait_until(lambda: watcher.fail_static, within=3, what="fail static")
            assert metrics.EVIDENCE_MODE._value.get() == 1
            assert state(watcher, "kent") is S.OVERLOADED  # last known-good kept
            assert watcher.status()["kent"]["evidence"] == "fail_static"
            await wait_until(lambda: watcher.mode is EvidenceMode.PROBES_ONLY, within=3,
                             what="fail static expires")
            assert metrics.EVIDENCE_MODE._value.get() == 0
            await wait_until(lambda: state(watcher, "kent") is S.UNKNOWN, what="kent unknown")

            broker.start()
            await wait_until(lambda: link.connected and link.connections == 2, within=10,
                             what="reconnect")
            await wait_until(lambda: watcher.mode is EvidenceMode.LIVE, what="live again")
            await asyncio.sleep(0.1)
            async with aiomqtt.Client(broker.host, broker.port, timeout=5) as pub:
                await pub.publish("overflow/centres/kent/telemetry", telemetry())
                await wait_until(lambda: state(watcher, "kent") is S.NORMAL, what="kent back")
                await pub.subscribe("overflow/state/met")  # queued while the broker was gone
                async with asyncio.timeout(3):
                    message = await anext(aiter(pub.messages))
                payload = json.loads(bytes(message.payload))
                assert payload["state"] == "down" and payload["source"] == "probe"
            assert link.pending == 0
    finally:
        audit.close()


async def test_overrides_expire_and_are_audited(tmp_path: Path,
                                                sip: tuple[SipResponder, str]) -> None:
    _, target = sip
    config = make_config(FAST, probes=met_probes(target), telemetry=False)
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=None, audit=audit)
    try:
        async with running(watcher.run()):
            await wait_until(lambda: state(watcher, "met") is S.NORMAL, what="met normal")
            assert not watcher.clear_override("met", source="manager:T")
            watcher.override("met", S.DRAINING, "planned move", expires_in_s=0.4,
                             source="manager:T")
            assert state(watcher, "met") is S.DRAINING  # at once, not on the next poll
            assert watcher.status()["met"]["override"]["reason"] == "planned move"
            took = await wait_until(lambda: state(watcher, "met") is not S.DRAINING,
                                    what="expiry")
            assert 0.3 < took < 1.0
            assert state(watcher, "met") is S.RECOVERING  # it took no calls: ramp back
            watcher.override("kent", S.DOWN, "fire", expires_in_s=None, source="manager:T")
            await asyncio.sleep(0.2)
            assert state(watcher, "kent") is S.DOWN
            assert watcher.clear_override("kent", source="manager:U")
            assert state(watcher, "kent") is S.UNKNOWN
    finally:
        audit.close()
    kinds = [(r["kind"], r["force"], r["source"]) for r in read_audit(tmp_path / "audit.jsonl")
             if r["kind"] != "state_change"]
    assert kinds == [("declaration", "met", "manager:T"), ("expiry", "met", "manager:T"),
                     ("declaration", "kent", "manager:T"), ("clear", "kent", "manager:U")]


async def test_a_flapping_centre_changes_routes_no_more_than_damping_allows(
        tmp_path: Path, sip: tuple[SipResponder, str], partners: HealthServer) -> None:
    responder, target = sip
    config = make_config(FAST, probes=met_probes(target, partners_url=partners.url),
                         telemetry=False)
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=None, audit=audit)
    policy, ledger = Policy(config), Ledger()
    homes: list[bool] = []

    def on_change(snapshot: Snapshot) -> None:
        plan = policy.plan(Service.EMERGENCY, "met", snapshot, ledger, time.monotonic())
        home = any(s.destination == "met" for s in plan)
        if not homes or homes[-1] != home:
            homes.append(home)

    watcher.add_listener(on_change)
    fd = config.health.flap_damping
    try:
        async with running(watcher.run()):
            await wait_until(lambda: all(v.state is S.NORMAL
                                         for v in watcher.snapshot.centres.values()),
                             what="all normal")
            homes.clear()
            homes.append(True)
            deadline = time.monotonic() + fd.window_s * 0.75
            while time.monotonic() < deadline:  # 0.3 s up, 0.3 s down
                responder.answering = not responder.answering
                await asyncio.sleep(0.3)
            assert state(watcher, "met") is S.DOWN
            assert "flap damping" in watcher.status()["met"]["reason"]
    finally:
        audit.close()
    route_changes = len(homes) - 1
    assert 1 <= route_changes <= fd.max_transitions + 1, homes


async def test_reconfigure_keeps_state_and_restarts_probes(
        tmp_path: Path, sip: tuple[SipResponder, str]) -> None:
    responder, target = sip
    config = make_config(FAST, probes=met_probes(target), telemetry=False)
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = Watcher(config, mqtt=None, audit=audit)
    try:
        async with running(watcher.run()):
            await wait_until(lambda: state(watcher, "met") is S.NORMAL, what="met normal")
            responder.answering = False
            await wait_until(lambda: state(watcher, "met") is S.DOWN, what="met down")
            slower: RouterConfig = make_config({**FAST, "interval_s": 0.1},
                                               probes=met_probes(target), telemetry=False)
            watcher.reconfigure(slower)
            assert state(watcher, "met") is S.DOWN  # evidence kept across the reload
            responder.answering = True
            await wait_until(lambda: state(watcher, "met") is S.RECOVERING, what="probes run")
    finally:
        audit.close()
