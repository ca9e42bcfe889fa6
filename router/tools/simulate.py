"""`overflow-router simulate`: replay a scenario of call arrivals and outages in virtual time.

A discrete-event simulation: no sleeping and no wall clock, so three hours of a bad night replay
in well under a second and the same seed always gives the same report. Calls arrive as Poisson
processes per force and service, are decided by the real `Policy` against a `Snapshot` built
from the scenario's timeline, stay in the real `Ledger` for their handling time, then end.

Each (force, service) stream draws from its own seeded generator, so adding a force to a
scenario does not reshuffle the calls of the others.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from router.config import ConfigError, ConfigIssue, RouterConfig, Strict, YamlTree, parse_document
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot
from router.engine.policy import Policy
from router.engine.rules import aid_cap

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]


# ---- the scenario file ----------------------------------------------------------------------


class HandlingTime(Strict):
    """How long a call occupies a centre (waiting plus talking plus wrap-up)."""

    distribution: Literal["exponential", "lognormal", "fixed"] = "lognormal"
    mean_s: PosFloat
    sigma: PosFloat = 0.6  # lognormal shape: larger means a longer tail of long calls

    def draw(self, rng: random.Random) -> float:
        if self.distribution == "fixed":
            return self.mean_s
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean_s)
        # choose mu so that the lognormal's mean is mean_s
        return rng.lognormvariate(math.log(self.mean_s) - self.sigma ** 2 / 2, self.sigma)


class Episode(Strict):
    """A stretch of time during which a centre is not its normal self.

    A `down` episode that ends is followed by `recovering` for the config's ramp (unless
    `recover: false`), with `since` at its end, exactly as the live watcher reports it.
    """

    force: str
    from_s: NonNegFloat
    to_s: PosFloat | None = None  # None: until the end of the scenario
    state: CentreState | None = None
    telephony_up: bool | None = None
    cad_up: bool | None = None
    recover: bool = True

    @model_validator(mode="after")
    def _sense(self) -> Episode:
        if self.to_s is not None and self.to_s <= self.from_s:
            raise ValueError(f"to_s: {self.to_s} is not after from_s {self.from_s}")
        if self.state is None and self.telephony_up is None and self.cad_up is None:
            raise ValueError("changes nothing: give state, telephony_up or cad_up")
        return self


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    duration_s: PosFloat
    handling: dict[Service, HandlingTime]
    arrivals: dict[str, dict[Service, NonNegFloat]]  # calls per hour, per force and service
    timeline: tuple[Episode, ...] = ()

    @model_validator(mode="after")
    def _both_services(self) -> Scenario:
        missing = [s.value for s in Service if s not in self.handling]
        if missing:
            raise ValueError(f"handling: missing service {' and '.join(missing)}")
        return self


def load_scenario(path: str | Path, config: RouterConfig) -> Scenario:
    """Read and validate a scenario against the config it will run on; raises ConfigError
    with every problem as `FILE:LINE: key: message`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "(file)", exc.strerror or str(exc))]) from None

    def cross_check(tree: YamlTree, scenario: Scenario) -> Iterable[ConfigIssue]:
        known = ", ".join(sorted(config.forces))
        for fid in scenario.arrivals:
            if fid not in config.forces:
                yield tree.issue(("arrivals", fid), f"unknown force {fid!r} (known: {known})")
        for i, episode in enumerate(scenario.timeline):
            if episode.force not in config.forces:
                yield tree.issue(("timeline", i, "force"),
                                 f"unknown force {episode.force!r} (known: {known})")
            if episode.from_s >= scenario.duration_s:
                yield tree.issue(("timeline", i, "from_s"),
                                 f"starts after the scenario ends ({scenario.duration_s:g} s)")

    return parse_document(text, str(path), Scenario, cross_check)


# ---- the timeline ---------------------------------------------------------------------------


class Timeline:
    """Centre views over virtual time, from the scenario's episodes."""

    def __init__(self, scenario: Scenario, config: RouterConfig):
        recovery = config.health.recovery
        self._ramp_s = len(recovery.ramp) * recovery.step_s
        self._episodes = scenario.timeline
        self._forces = list(config.forces)

    def changes(self) -> list[float]:
        """Every instant at which some centre's view may change."""
        points = {0.0}
        for e in self._episodes:
            points.add(e.from_s)
            if e.to_s is not None:
                points.add(e.to_s)
                if e.state is CentreState.DOWN and e.recover:
                    points.add(e.to_s + self._ramp_s)
        return sorted(points)

    def snapshot(self, t: float, version: int) -> Snapshot:
        return Snapshot({fid: self.view(fid, t) for fid in self._forces}, version)

    def view(self, force: str, t: float) -> CentreView:
        state, since = CentreState.NORMAL, 0.0
        telephony_up = cad_up = True
        for e in self._episodes:  # back after a down: ramp, as the watcher would report
            if (e.force == force and e.state is CentreState.DOWN and e.recover
                    and e.to_s is not None and e.to_s <= t < e.to_s + self._ramp_s):
                state, since = CentreState.RECOVERING, e.to_s
        for e in self._episodes:  # episodes in force now; later ones in the file win
            if e.force != force or t < e.from_s or (e.to_s is not None and t >= e.to_s):
                continue
            if e.state is not None:
                state, since = e.state, e.from_s
            if e.telephony_up is not None:
                telephony_up = e.telephony_up
            if e.cad_up is not None:
                cad_up = e.cad_up
        return CentreView(state, telephony_up, cad_up, since)


# ---- the report -----------------------------------------------------------------------------


@dataclass
class Row:
    """One force and service: what its callers got, and what it carried."""

    force: str
    service: str
    offered: int = 0
    home: int = 0
    overflowed: dict[str, int] = field(default_factory=dict)  # by partner
    last_resort: int = 0
    shed: int = 0
    peak_in_flight: int = 0  # calls of this service at this centre, its own and others'
    peak_aid_in_flight: int = 0  # of which, taken for other forces
    aid_cap: int = 0  # the mutual-aid limit for this service (101: cap minus the 999 reserve)


@dataclass
class Report:
    scenario: str
    seed: int
    duration_s: float
    calls: int
    rows: list[Row]

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        head = (f"{'force':8} {'svc':>3} {'offered':>7} {'home':>6} {'last_res':>8} {'shed':>5} "
                f"{'peak':>5} {'aid peak/cap':>12}  overflowed to partners")
        lines = [f"{self.scenario} — seed {self.seed}, {self.duration_s / 3600:.2f} h virtual, "
                 f"{self.calls} calls", head]
        for r in self.rows:
            partners = " ".join(f"{p}:{n}" for p, n in sorted(r.overflowed.items(),
                                                              key=lambda kv: -kv[1])) or "-"
            lines.append(f"{r.force:8} {r.service:>3} {r.offered:>7} {r.home:>6} "
                         f"{r.last_resort:>8} {r.shed:>5} {r.peak_in_flight:>5} "
                         f"{f'{r.peak_aid_in_flight}/{r.aid_cap}':>12}  {partners}")
        return "\n".join(lines)


# ---- the replay -----------------------------------------------------------------------------


class _Kind(IntEnum):
    """Order of events at the same instant: free capacity first, then change states, then
    take new calls, so a call never waits on something that already happened."""

    END = 0
    STATE = 1
    ARRIVAL = 2


@dataclass(order=True, frozen=True, slots=True)
class _Event:
    t: float
    kind: _Kind
    seq: int  # an arrival and its end share one: the call's id
    force: str = field(default="", compare=False)
    service: Service = field(default=Service.EMERGENCY, compare=False)


def _arrivals(rng: random.Random, per_hour: float, until: float) -> Iterator[float]:
    t = 0.0
    while per_hour > 0:
        t += rng.expovariate(per_hour / 3600.0)
        if t >= until:
            return
        yield t


def simulate(config: RouterConfig, scenario: Scenario, seed: int = 0) -> Report:
    policy, ledger, timeline = Policy(config), Ledger(), Timeline(scenario, config)
    rows = {(fid, s): _empty_row(config, fid, s) for fid in config.forces for s in Service}
    aid_in_flight: Counter[tuple[str, Service]] = Counter()

    changes = timeline.changes()
    events = [_Event(t, _Kind.STATE, version) for version, t in enumerate(changes)]
    handling_rng: dict[tuple[str, Service], random.Random] = {}
    for fid, rates in scenario.arrivals.items():
        for service, per_hour in rates.items():
            stream = f"{seed}/{fid}/{service.value}"
            handling_rng[(fid, service)] = random.Random(f"{stream}/handling")
            events += (_Event(t, _Kind.ARRIVAL, 0, fid, service) for t in
                       _arrivals(random.Random(f"{stream}/arrivals"), per_hour,
                                 scenario.duration_s))
    # number the arrivals in time order: call ids then read in the order calls came in
    events.sort()
    events = [e if e.kind is _Kind.STATE else _Event(e.t, e.kind, n, e.force, e.service)
              for n, e in enumerate(events)]
    heapq.heapify(events)

    snapshot = Snapshot()
    calls = 0
    while events:
        e = heapq.heappop(events)
        if e.kind is _Kind.END:
            call = ledger.end(f"sim-{e.seq}")
            if call is not None and call.destination != call.origin:
                aid_in_flight[(call.destination, call.service)] -= 1
        elif e.kind is _Kind.STATE:
            snapshot = timeline.snapshot(e.t, e.seq)
        else:
            decision = policy.decide(e.service, e.force, snapshot, ledger, e.t)
            ledger.add(f"sim-{e.seq}", decision, e.t)
            calls += 1
            _count(rows, decision, ledger, aid_in_flight)
            end = e.t + scenario.handling[e.service].draw(handling_rng[(e.force, e.service)])
            if end < scenario.duration_s:
                heapq.heappush(events, _Event(end, _Kind.END, e.seq))
    return Report(scenario.name, seed, scenario.duration_s, calls, list(rows.values()))


def _empty_row(config: RouterConfig, force: str, service: Service) -> Row:
    aid = config.forces[force].mutual_aid
    return Row(force, service.value, aid_cap=aid_cap(aid, service) if service in aid.services
               else 0)


def _count(rows: dict[tuple[str, Service], Row], d: Decision, ledger: Ledger,
           aid_in_flight: Counter[tuple[str, Service]]) -> None:
    row = rows[(d.origin, d.service)]
    row.offered += 1
    if d.reason is Reason.HOME:
        row.home += 1
    elif d.reason is Reason.SHED:
        row.shed += 1
    elif d.reason is Reason.LAST_RESORT:
        row.last_resort += 1
    else:
        row.overflowed[d.destination] = row.overflowed.get(d.destination, 0) + 1
    at = rows[(d.destination, d.service)]
    at.peak_in_flight = max(at.peak_in_flight, ledger.by_service[(d.destination, d.service)])
    if d.is_aid:
        aid_in_flight[(d.destination, d.service)] += 1
        at.peak_aid_in_flight = max(at.peak_aid_in_flight,
                                    aid_in_flight[(d.destination, d.service)])
