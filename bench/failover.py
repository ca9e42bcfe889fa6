"""Failover time and flap damping: the live watcher against a Kamailio-dispatcher-like baseline.

`python -m bench failover [--trials N] [--seed N]`

1. Probes alone: a real UDP SIP responder for the Met stops answering; we time from that moment
   to the first snapshot on which `Policy.decide` sends a new 999 call elsewhere. Two watchers
   probe the same responder side by side, so both see the very same outages:
   - overflow-router at the bundled detection settings (interval 0.25 s, timeout 0.2 s,
     jitter 0.1, unhealthy_threshold 3);
   - the baseline: fixed interval, threshold 1 both ways, no ramp, no damping (how Kamailio's
     dispatcher probes with `ds_probing_threshold=1`), at the same interval and timeout.
   Both get a short recovery ramp and relaxed damping here only so back-to-back trials do not
   hold the centre down; detection does not depend on either.
2. Telemetry: a message `telephony_up: false` (or `cad_up: false`; the Met overflows on CAD
   loss) published on a private Mosquitto, timed from just before the publish.
   overflow-router confirms a first failure (or a silence past the edge interval) with probes
   at `unhealthy_edge_interval_s`; the baseline has no such thing.
2. Grey failure: the Met answers OPTIONS but its calls fail; calls ended with their outcome
   (as Kamailio reports them) until a new 999 call goes elsewhere: failed calls before
   diversion, every call failing and 3 in 4 failing.
3. Telemetry: as below.
4. Flapping: the Met alternates up/down every 2 s (and every 1 s) for 60 s, in virtual time
   through the pure state machine at the bundled settings (damping and edges included); we
   count changes of the Met's 999 routing plan, for both engines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiomqtt
import yaml

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Service, Snapshot
from router.engine.policy import Policy
from router.infra.audit import AuditLog
from router.infra.mqtt_link import MqttLink
from router.watch.health import CentreHealth, probe_id
from router.watch.watcher import Watcher

BUNDLED = Path(__file__).resolve().parent.parent / "config" / "forces.yaml"
ORIGIN = "met"
TRIAL_TIMEOUT_S = 10.0
BASELINE = {"jitter": 0.0, "unhealthy_threshold": 1, "healthy_threshold": 1,
            "unhealthy_edge_interval_s": None, "healthy_edge_interval_s": None,
            "recovery": {"ramp": [1.0], "step_s": 1.0},
            "flap_damping": {"window_s": 60, "max_transitions": 10**6, "hold_s": 1,
                             "max_hold_s": 1}}
TRIAL_RELAX = {"recovery": {"ramp": [0.5, 1.0], "step_s": 0.05},
               "flap_damping": {"window_s": 60, "max_transitions": 10**6, "hold_s": 1,
                                "max_hold_s": 1}}


# ---- set-up ---------------------------------------------------------------------------------


def config_for(health: dict[str, Any], met_sip: str, partners_sip: str,
               mqtt_port: int | None = None) -> RouterConfig:
    """The bundled config, its health settings overridden, probing loopback responders."""
    raw = yaml.safe_load(BUNDLED.read_text())
    raw["health"] = {**raw["health"], **health}
    for fid, force in raw["forces"].items():
        target = met_sip if fid == ORIGIN else partners_sip
        force["centre"]["probes"] = [{"kind": "sip", "target": target, "component": "telephony"}]
        force["centre"]["telemetry"] = mqtt_port is not None
    raw["mqtt"] = {"enabled": mqtt_port is not None, "host": "127.0.0.1",
                   "port": mqtt_port or 1883}
    return RouterConfig.model_validate(raw)


class Responder(asyncio.DatagramProtocol):
    """Answers SIP OPTIONS with 200 OK while `answering`."""

    def __init__(self) -> None:
        self.answering = True
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.answering or self.transport is None:
            return
        head = [ln for ln in data.decode(errors="replace").split("\r\n")
                if ln.split(":", 1)[0] in ("Via", "From", "To", "Call-ID", "CSeq")]
        self.transport.sendto("\r\n".join(["SIP/2.0 200 OK", *head, "Content-Length: 0", "",
                                           ""]).encode(), addr)


@contextlib.asynccontextmanager
async def responder() -> AsyncIterator[tuple[Responder, str]]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        Responder, local_addr=("127.0.0.1", 0))
    try:
        yield protocol, f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    finally:
        transport.close()


@contextlib.contextmanager
def mosquitto() -> Iterator[int | None]:
    """A private broker on a free loopback port, or None when mosquitto is not installed."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(5)


class FailoverClock:
    """A snapshot listener: the moment a new 999 call from the Met would go elsewhere."""

    def __init__(self, config: RouterConfig):
        self.policy, self.ledger = Policy(config), Ledger()
        self.armed_at: float | None = None
        self.took: float | None = None
        self.done = asyncio.Event()

    def arm(self, t0: float) -> None:
        self.armed_at, self.took = t0, None
        self.done.clear()

    def __call__(self, snapshot: Snapshot) -> None:
        if self.armed_at is None or self.took is not None:
            return
        now = time.monotonic()
        decision = self.policy.decide(Service.EMERGENCY, ORIGIN, snapshot, self.ledger, now)
        if decision.destination != ORIGIN:
            self.took = now - self.armed_at
            self.done.set()


def home(w: Watcher) -> bool:
    return all(v.state is CentreState.NORMAL and v.cad_up for v in w.snapshot.centres.values())


async def until(predicate: Callable[[], bool], limit_s: float = TRIAL_TIMEOUT_S) -> None:
    """Poll a condition between trials (not a timed path: the clocks above are event-driven)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not settled within {limit_s}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching(*watchers: Watcher, links: tuple[MqttLink, ...] = ()) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    tasks += [asyncio.create_task(link.run()) for link in links]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- the three measurements -----------------------------------------------------------------


async def probe_trials(trials: int, rng: random.Random, tmp: Path) -> dict[str, list[float]]:
    async with responder() as (met, met_target), responder() as (_, partners_target):
        bundled = yaml.safe_load(BUNDLED.read_text())["health"]
        ours_cfg = config_for({**bundled, **TRIAL_RELAX}, met_target, partners_target)
        base_cfg = config_for({**bundled, **BASELINE}, met_target, partners_target)
        clocks = {"overflow-router": FailoverClock(ours_cfg), "baseline": FailoverClock(base_cfg)}
        watchers = []
        for (name, clock), cfg in zip(clocks.items(), (ours_cfg, base_cfg), strict=True):
            w = Watcher(cfg, mqtt=None, audit=AuditLog(tmp / f"{name}.jsonl"))
            w.add_listener(clock)
            watchers.append(w)
        out: dict[str, list[float]] = {name: [] for name in clocks}
        async with watching(*watchers):
            for _ in range(trials):
                await until(lambda: all(home(w) for w in watchers))
                await asyncio.sleep(rng.uniform(0.3, 0.6))  # a random phase against the probes
                t0 = time.monotonic()
                for clock in clocks.values():
                    clock.arm(t0)
                met.answering = False
                for name, clock in clocks.items():
                    async with asyncio.timeout(TRIAL_TIMEOUT_S):
                        await clock.done.wait()
                    out[name].append(cast(float, clock.took))
                met.answering = True
    return out


def telemetry(**over: Any) -> bytes:
    return json.dumps({"ts": time.time(), "telephony_up": True, "cad_up": True,
                       "calls_waiting": 0, "handlers_available": 5, "handlers_on_duty": 40,
                       "oldest_wait_s": 0.0, **over}).encode()


async def telemetry_trials(trials: int, rng: random.Random, tmp: Path,
                           port: int) -> dict[str, list[float]]:
    async with responder() as (_, met_target), responder() as (_, partners_target):
        bundled = yaml.safe_load(BUNDLED.read_text())["health"]
        cfg = config_for({**bundled, **TRIAL_RELAX}, met_target, partners_target, port)
        link = MqttLink(cfg.mqtt)
        watcher = Watcher(cfg, mqtt=link, audit=AuditLog(tmp / "telemetry.jsonl"))
        clock = FailoverClock(cfg)
        watcher.add_listener(clock)
        out: dict[str, list[float]] = {"telephony_up: false": [], "cad_up: false": []}
        topic = f"{cfg.mqtt.prefix}centres/{ORIGIN}/telemetry"
        async with watching(watcher, links=(link,)), \
                aiomqtt.Client("127.0.0.1", port, timeout=5) as pub:
            await until(lambda: link.connected)
            await asyncio.sleep(0.2)  # the link subscribes right after connecting
            for i in range(trials * 2):
                for fid in cfg.forces:
                    await pub.publish(f"{cfg.mqtt.prefix}centres/{fid}/telemetry", telemetry())
                await until(lambda: home(watcher))
                await asyncio.sleep(rng.uniform(0.05, 0.15))
                kind = "telephony_up" if i % 2 == 0 else "cad_up"
                clock.arm(time.monotonic())
                await pub.publish(topic, telemetry(**{kind: False}))
                async with asyncio.timeout(TRIAL_TIMEOUT_S):
                    await clock.done.wait()
                out[f"{kind}: false"].append(cast(float, clock.took))
    return out


def flap_route_changes(health: dict[str, Any], toggle_s: float, duration_s: float,
                       seed: int) -> int:
    """Virtual time: probe at the configured interval and jitter, and at the edge interval
    while confirming, as router/watch/prober.py does; a failed probe is known when it times
    out (`timeout_s`, or the edge interval for an edge probe; a silent regular probe turns
    suspect after the edge interval and is overtaken by edge probes). Counts changes of the
    Met's 999 plan (destinations, shares)."""
    cfg = config_for(health, "127.0.0.1:9", "127.0.0.1:9")
    h = cfg.health
    machine = CentreHealth(ORIGIN, h, cfg.forces[ORIGIN].centre)
    pid = probe_id(cfg.forces[ORIGIN].centre.probes[0])
    others = {fid: CentreView(CentreState.NORMAL) for fid in cfg.forces}
    policy, ledger = Policy(cfg), Ledger()
    rng = random.Random(seed)
    machine.probe_result(pid, True, -1.0)

    def plan(now: float) -> tuple[tuple[str, float], ...]:
        snapshot = Snapshot({**others, ORIGIN: machine.view})
        return tuple((s.destination, round(s.share, 3))
                     for s in policy.plan(Service.EMERGENCY, ORIGIN, snapshot, ledger, now))

    last, changes, t = plan(0.0), 0, 0.0
    last_ok, suspect = True, False
    while t < duration_s:
        up = int(t / toggle_s) % 2 == 0
        edge = machine.edge_interval(pid) or (h.unhealthy_edge_interval_s if suspect else None)
        quick = min(h.timeout_s, edge or h.unhealthy_edge_interval_s or h.timeout_s)
        if edge is None and not up and last_ok and h.unhealthy_edge_interval_s is not None:
            suspect, t = True, t + quick  # silent past the edge: edge probes take over
            continue
        at = t if up else t + (quick if edge else h.timeout_s)
        machine.probe_result(pid, up, at)
        machine.tick(at)
        last_ok, suspect = up, False
        now_plan = plan(at)
        if now_plan != last:
            changes, last = changes + 1, now_plan
        t += edge if edge is not None else h.interval_s * (1 + rng.uniform(-h.jitter, h.jitter))
    return changes


async def grey_failure(tmp: Path, fail_every: int) -> int:
    """A Met that answers SIP OPTIONS throughout but whose calls fail (all of them, or all
    but every `fail_every`-th): 999 calls routed by the call desk on the live watcher's
    snapshot, each ended with its outcome as Kamailio reports it. Returns how many calls
    failed at the Met before the first new call went elsewhere."""
    from router.engine.calls import CallDesk
    from router.watch.outliers import Outcome

    async with responder() as (_, met_target), responder() as (_, partners_target):
        bundled = yaml.safe_load(BUNDLED.read_text())["health"]
        cfg = config_for(bundled, met_target, partners_target)
        watcher = Watcher(cfg, mqtt=None, audit=AuditLog(tmp / f"grey-{fail_every}.jsonl"))
        desk = CallDesk(cfg)
        failed = 0
        async with watching(watcher):
            await until(lambda: home(watcher))
            for n in range(1000):
                record, _ = desk.route(f"g{fail_every}-{n}", Service.EMERGENCY, ORIGIN,
                                       watcher.snapshot)
                destination = desk.finish(record["call_id"])
                if destination != ORIGIN:
                    return failed
                ok = fail_every > 0 and n % fail_every == fail_every - 1
                failed += 0 if ok else 1
                watcher.call_outcome(ORIGIN, Outcome.ANSWERED if ok else Outcome.FAILED)
                await asyncio.sleep(0.01)  # calls 10 ms apart: the window sees them all
    raise RuntimeError("never diverted")


# ---- report ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(round(q * (len(ordered) - 1)), len(ordered) - 1)]


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {len(values)} | {pct(values, 0.5) * 1000:.0f} | "
            f"{pct(values, 0.99) * 1000:.0f} | {max(values) * 1000:.0f} | "
            f"{statistics.mean(values) * 1000:.0f} |")


async def run(trials: int, seed: int) -> int:
    rng = random.Random(seed)
    header = "| engine | trials | p50 ms | p99 ms | max ms | mean ms |\n|---|---|---|---|---|---|"
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"probes alone, SIP responder stops answering ({trials} trials, side by side)")
        probes = await probe_trials(trials, rng, Path(tmp))
        print(header)
        for name, values in probes.items():
            print(row(name, values))
        ours, base = probes["overflow-router"], probes["baseline"]
        ratio = pct(ours, .99) / pct(base, .99)
        print(f"p50 ratio overflow-router/baseline: {pct(ours, .5) / pct(base, .5):.2f}; "
              f"p99 ratio: {ratio:.2f} (goal <= 1.0)")
        if ratio > 1.0:
            print("TARGET MISSED: probe failover p99 slower than the threshold-1 baseline")
            status = 1
        print("\ngrey failure: the Met answers SIP OPTIONS, its calls fail")
        for every, what in ((0, "every call fails"), (4, "3 calls in 4 fail")):
            n = await grey_failure(Path(tmp), every)
            print(f"{what}: failed calls before diversion: {n}")
        with mosquitto() as port:
            if port is None:
                print("\ntelemetry: skipped (mosquitto not installed)")
            else:
                print(f"\ntelemetry message on a private Mosquitto ({trials} trials each)")
                tele = await telemetry_trials(trials, rng, Path(tmp), port)
                print(header.replace("engine", "message"))
                for name, values in tele.items():
                    print(row(name, values))
                if max(pct(v, 0.99) for v in tele.values()) > 0.1:
                    print("TARGET MISSED: telemetry failover p99 > 100 ms")
                    status = 1
    bundled = yaml.safe_load(BUNDLED.read_text())["health"]
    print("\nflapping for 60 s, virtual time (route changes of met's 999 plan)")
    print("| flap | overflow-router | baseline | ratio |\n|---|---|---|---|")
    for toggle in (2.0, 1.0):
        ours_n = flap_route_changes(bundled, toggle, 60.0, seed)
        base_n = flap_route_changes({**bundled, **BASELINE}, toggle, 60.0, seed)
        print(f"| state changes every {toggle:g} s | {ours_n} | {base_n} | "
              f"{base_n / max(ours_n, 1):.1f}x fewer |")
        print(f"flap route changes ({toggle:g} s): {ours_n} (goal <= 3)")
        if ours_n > 3:
            print(f"TARGET MISSED: more than 3 route changes while flapping every {toggle:g} s")
            status = 1
    return status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench failover")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2025)
    args = parser.parse_args(argv)
    quiet = logging.getLogger("router")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # every trial is a real outage: keep the table readable
    try:
        return asyncio.run(run(max(args.trials, 1), args.seed))
    finally:
        quiet.setLevel(level)
