"""Runs every configured probe on its interval and hands each result to the watcher.

Fixed rate with jitter (Envoy): a slow probe does not push the next one back, and the first
round is spread over one interval so eight centres are not probed in the same millisecond.
Fast confirmation (Envoy's edge intervals, HAProxy's `fastinter`): while a probe's verdict is
on an edge (the health machine says so), or a probe of a healthy centre stays silent for
longer than its answers usually take, probes go out at the edge interval, overlapping if need
be, each timing out after the edge interval or four times the slowest recent answer (never
after `timeout_s`). A result older than one already handed on is dropped.
A reload restarts the loops with the new probes and intervals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from router.config import Probe, RouterConfig
from router.infra import metrics
from router.watch.health import probe_id
from router.watch.probes import FailureLog, ProbeResult, run_probe

log = logging.getLogger(__name__)

OnResult = Callable[[str, str, ProbeResult], None]  # (force, probe id, result)
EdgeOf = Callable[[str, str], float | None]  # (force, probe id) -> edge interval, if on one


@dataclass(frozen=True, slots=True)
class LastProbe:
    result: ProbeResult
    at: float  # wall clock


class _Reload(Exception):
    """Raised inside the probe group to restart it with a new config."""


class Prober:
    def __init__(self, config: RouterConfig, on_result: OnResult,
                 wall_clock: Callable[[], float] = time.time,
                 edge: EdgeOf = lambda force, pid: None):
        self._config = config
        self._on_result = on_result
        self._edge = edge
        self._wall = wall_clock
        self.last: dict[str, dict[str, LastProbe]] = {fid: {} for fid in config.forces}
        self._reload = asyncio.Event()

    def reconfigure(self, config: RouterConfig) -> None:
        self._config = config
        for fid in config.forces:
            self.last.setdefault(fid, {})
        self._reload.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            self._reload.clear()
            try:
                async with asyncio.TaskGroup() as tg:
                    for fid, force in self._config.forces.items():
                        for probe in force.centre.probes:
                            tg.create_task(self._loop(fid, probe, session),
                                           name=f"probe {fid} {probe_id(probe)}")
                    tg.create_task(self._until_reload())
            except* _Reload:
                log.info("probes restarted for the reloaded config")

    async def _until_reload(self) -> None:
        await self._reload.wait()
        raise _Reload

    async def _loop(self, force: str, probe: Probe, session: aiohttp.ClientSession) -> None:
        health = self._config.health
        interval = probe.interval_s or health.interval_s
        timeout = probe.timeout_s or health.timeout_s
        run = _Run(force, probe_id(probe), FailureLog(f"{force} {probe_id(probe)}"))
        next_at = time.monotonic() + random.uniform(0, interval)
        async with asyncio.TaskGroup() as tg:  # probes may overlap while on an edge
            while True:
                await asyncio.sleep(max(next_at - time.monotonic(), 0.0))
                edge = self._edge(force, run.pid) or (
                    health.unhealthy_edge_interval_s if run.suspect else None)
                quick = min(timeout, max(edge or health.unhealthy_edge_interval_s or timeout,
                                         4 * max(run.answers, default=0.0)))
                run.seq += 1
                task = tg.create_task(self._one(run, run.seq, probe, quick if edge else timeout,
                                                session))
                if edge is not None:  # confirming: the next probe at the edge interval
                    next_at = time.monotonic() + edge
                    continue
                next_at = max(next_at + interval * (1 + random.uniform(-health.jitter,
                                                                       health.jitter)),
                              time.monotonic())
                if run.last_ok and health.unhealthy_edge_interval_s is not None \
                        and quick < timeout:
                    # silence for longer than the centre usually takes is suspect: confirm now
                    done, _ = await asyncio.wait({task}, timeout=quick)
                    if not done and run.applied < run.seq:
                        run.suspect, next_at = True, time.monotonic()

    async def _one(self, run: _Run, seq: int, probe: Probe, limit_s: float,
                   session: aiohttp.ClientSession) -> None:
        result = await run_probe(probe, limit_s, session)
        metrics.PROBE_SECONDS.labels(run.force, probe.kind).observe(result.latency_s)
        if not result.ok:
            metrics.PROBE_FAILURES.labels(run.force, probe.kind).inc()
        if seq < run.applied:
            return  # overtaken by a newer probe's result: evidence only moves forward
        run.applied, run.suspect, run.last_ok = seq, False, result.ok
        if result.ok:
            run.answers.append(result.latency_s)
        run.failures.record(result)
        self.last.setdefault(run.force, {})[run.pid] = LastProbe(result, self._wall())
        self._on_result(run.force, run.pid, result)


@dataclass(slots=True)
class _Run:
    """One probe's loop: which results are newest, and whether silence makes it suspect."""

    force: str
    pid: str
    failures: FailureLog
    seq: int = 0  # probes started
    applied: int = 0  # the newest probe whose result was handed on
    suspect: bool = False  # the last probe is unanswered for longer than answers usually take
    last_ok: bool = False
    answers: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # latencies
