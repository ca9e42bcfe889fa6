"""Who calls, when, and what each caller will do: drawn once per seed, so every strategy
faces the very same callers (common random numbers) and differences come from routing alone.

Each (force, service) stream draws from its own seeded generators, so adding a force or a
service does not reshuffle the callers of the others. A caller's patience, handling time and
whether (and when) they call again are drawn up front for every attempt they may make.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from router.engine.model import Service
from router.tools.sim.scenario import Scenario
from router.tools.sim.truth import rate_segments

GIVES_UP = -1.0  # a redial delay meaning: this caller does not call again


@dataclass(frozen=True, slots=True)
class Caller:
    origin: str
    service: Service
    lane: int  # 0 for 999, 1 for 101: the queue it joins, 999 ahead of 101
    draws: tuple[float, ...]  # per attempt: patience, handling, redial delay (or GIVES_UP)

    def patience(self, attempt: int) -> float:
        return self.draws[3 * attempt]

    def handling(self, attempt: int) -> float:
        return self.draws[3 * attempt + 1]

    def redial(self, attempt: int) -> float:
        return self.draws[3 * attempt + 2]


LANE = {Service.EMERGENCY: 0, Service.NON_EMERGENCY: 1}


def generate(scenario: Scenario, seed: int) -> list[tuple[float, Caller]]:
    """Every first call of the night, in time order."""
    out: list[tuple[float, Caller]] = []
    for fid, rates in scenario.arrivals.items():
        for service in rates:
            stream = f"{seed}/{fid}/{service.value}"
            arrivals = random.Random(f"{stream}/arrivals")
            draws = random.Random(f"{stream}/callers")
            for a, b, per_hour in rate_segments(scenario, fid, service):
                t = a
                while per_hour > 0:
                    t += arrivals.expovariate(per_hour / 3600.0)
                    if t >= b:
                        break
                    out.append((t, Caller(fid, service, LANE[service],
                                          _draws(scenario, service, draws))))
    out.sort(key=lambda tc: tc[0])
    return out


def _draws(scenario: Scenario, service: Service, rng: random.Random) -> tuple[float, ...]:
    handling = scenario.handling[service]
    patience = scenario.patience.get(service)
    repeat = scenario.repeat.get(service)
    attempts = repeat.max_attempts if repeat is not None else 1
    out: list[float] = []
    for k in range(attempts):
        out.append(patience.draw(rng) if patience is not None else math.inf)
        out.append(handling.draw(rng))
        again = GIVES_UP
        if repeat is not None and k < attempts - 1:
            u, delay = rng.random(), rng.expovariate(1.0 / repeat.mean_delay_s)
            again = delay if u < repeat.probability else GIVES_UP
        out.append(again)
    return tuple(out)
