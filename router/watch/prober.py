"""Runs every configured probe on its interval and hands each result to the watcher.

Fixed rate with jitter (Envoy): a slow probe does not push the next one back, and the first
round is spread over one interval so eight centres are not probed in the same millisecond.
A reload restarts the loops with the new probes and intervals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from router.config import Probe, RouterConfig
from router.infra import metrics
from router.watch.health import probe_id
from router.watch.probes import FailureLog, ProbeResult, run_probe

log = logging.getLogger(__name__)

OnResult = Callable[[str, str, ProbeResult], None]  # (force, probe id, result)


@dataclass(frozen=True, slots=True)
class LastProbe:
    result: ProbeResult
    at: float  # wall clock


class _Reload(Exception):
    """Raised inside the probe group to restart it with a new config."""


class Prober:
    def __init__(self, config: RouterConfig, on_result: OnResult,
                 wall_clock: Callable[[], float] = time.time):
        self._config = config
        self._on_result = on_result
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
        pid = probe_id(probe)
        failures = FailureLog(f"{force} {pid}")
        latency = metrics.PROBE_SECONDS.labels(force, probe.kind)
        failed = metrics.PROBE_FAILURES.labels(force, probe.kind)
        next_at = time.monotonic() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(next_at - time.monotonic(), 0.0))
            next_at = max(next_at + interval * (1 + random.uniform(-health.jitter, health.jitter)),
                          time.monotonic())
            result = await run_probe(probe, timeout, session)
            latency.observe(result.latency_s)
            if not result.ok:
                failed.inc()
            failures.record(result)
            self.last.setdefault(force, {})[pid] = LastProbe(result, self._wall())
            self._on_result(force, pid, result)
