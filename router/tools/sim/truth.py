"""What is really happening at each centre over the night, read from the scenario: phones and
CAD, staff on duty, surges, and the load offered to each centre before anyone diverts.

Kept apart from what the router believes (router/tools/sim/in_loop.py): the router learns
this only through probes, telemetry and declarations, with their delays.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from router.config import RouterConfig
from router.engine.model import Service
from router.tools.sim.scenario import Episode, Scenario, clock_at


@dataclass(frozen=True, slots=True)
class Truth:
    phones_up: bool = True
    cad_up: bool = True
    silent: bool = False  # the centre's ACD publishes no telemetry
    arrivals_factor: float = 1.0
    handlers: int | None = None  # None: the shift's
    handling_factor: float = 1.0
    external_aid: int = 0


def episodes(scenario: Scenario, force: str) -> list[Episode]:
    return [e for e in scenario.timeline if e.force == force]


def truth_at(scenario: Scenario, force: str, t: float) -> Truth:
    """Episodes in force at `t`; later ones in the file win, external aid adds up."""
    fields: dict[str, object] = {}
    external = 0
    for e in episodes(scenario, force):
        if t < e.from_s or (e.to_s is not None and t >= e.to_s):
            continue
        for key in ("arrivals_factor", "handlers", "handling_factor"):
            if getattr(e, key) is not None:
                fields[key] = getattr(e, key)
        for key, value in (("phones_up", e.telephony_up), ("cad_up", e.cad_up)):
            if value is not None:
                fields[key] = value
        if e.telemetry is not None:
            fields["silent"] = e.telemetry == "silent"
        external += e.external_aid or 0
    return Truth(external_aid=external, **fields)  # type: ignore[arg-type]


def change_times(scenario: Scenario, force: str) -> list[float]:
    """Every instant at which `force`'s truth may change (episode edges and shift changes)."""
    points = {t for t, _ in shift_steps(scenario, force, 0)}
    for e in episodes(scenario, force):
        points.add(e.from_s)
        if e.to_s is not None and e.to_s < scenario.duration_s:
            points.add(e.to_s)
    return sorted(points)


def shift_steps(scenario: Scenario, force: str, default: int) -> list[tuple[float, float]]:
    return scenario.steps(((s.at, s.handlers) for s in scenario.shifts.get(force, ())), default)


def handlers_at(scenario: Scenario, force: str, t: float, default: int) -> int:
    truth = truth_at(scenario, force, t)
    if truth.handlers is not None:
        return truth.handlers
    return int(_step_value(shift_steps(scenario, force, default), t))


def _step_value(steps: list[tuple[float, float]], t: float) -> float:
    value = steps[0][1]
    for at, v in steps:
        if at > t:
            break
        value = v
    return value


def rate_segments(scenario: Scenario, force: str, service: Service) -> list[
        tuple[float, float, float]]:
    """(from, to, calls per hour) over the scenario: the base rate times the time-of-day
    profile times any surge."""
    base = scenario.arrivals.get(force, {}).get(service, 0.0)
    profile = scenario.steps(((p.at, p.factor) for p in scenario.profile), 1.0)
    points = {t for t, _ in profile} | {0.0}
    for e in episodes(scenario, force):
        points |= {e.from_s} | ({e.to_s} if e.to_s is not None else set())
    edges = [*sorted(p for p in points if p < scenario.duration_s), scenario.duration_s]
    return [(a, b, base * _step_value(profile, a) * truth_at(scenario, force, a).arrivals_factor)
            for a, b in pairwise(edges) if b > a]


def phones_down(scenario: Scenario, force: str) -> list[tuple[float, float]]:
    """The stretches during which `force`'s phones are really down."""
    return down(scenario, force, "phones_up")


def down(scenario: Scenario, force: str, part: str) -> list[tuple[float, float]]:
    """The stretches during which `part` (`phones_up` or `cad_up`) of `force` is false."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for t in [*change_times(scenario, force), scenario.duration_s]:
        up = t >= scenario.duration_s or getattr(truth_at(scenario, force, t), part)
        if not up and start is None:
            start = t
        elif up and start is not None:
            out.append((start, t))
            start = None
    return out


def load_warnings(scenario: Scenario, config: RouterConfig) -> list[str]:
    """Each stretch in which a centre's own offered load (in Erlangs: calls per second times
    mean handling time) reaches the handlers it has: its queue can only grow."""
    out = []
    region: set[float] = set()
    for fid in config.forces:
        rows = _loads(scenario, config, fid)
        region |= {row[0] for row in rows}
        group: list[tuple[float, float, float, float]] = []
        for row in [*rows, (scenario.duration_s, scenario.duration_s, 0.0, 1.0)]:
            if row[2] > 0 and row[2] >= row[3]:
                group.append(row)
                continue
            if group:
                load, staff = max(((g[2], g[3]) for g in group), key=lambda x: x[0] / max(x[1], 1))
                out.append(f"{fid}: offered load {load:.1f} Erlangs reaches its {staff:.0f} "
                           f"handlers {clock_at(scenario, group[0][0])}-"
                           f"{clock_at(scenario, group[-1][1])}: its queue grows until callers "
                           "give up")
                group = []
    for a in sorted(region):
        load = staff = 0.0
        for fid in config.forces:
            load += _load(scenario, fid, a)
            staff += _staff(scenario, config, fid, a)
        if load > 0 and load >= staff:
            out.append(f"region: offered load {load:.1f} Erlangs at {clock_at(scenario, a)} "
                       f"reaches the {staff:.0f} handlers of all centres together: no diversion "
                       "can help")
            break
    return out


def _loads(scenario: Scenario, config: RouterConfig, fid: str) -> list[
        tuple[float, float, float, float]]:
    """(from, to, offered Erlangs, handlers free for them) in stretches of constant truth."""
    points = set(change_times(scenario, fid))
    for service in Service:
        points |= {a for a, _, _ in rate_segments(scenario, fid, service)}
    edges = [*sorted(p for p in points if p < scenario.duration_s), scenario.duration_s]
    return [(a, b, _load(scenario, fid, a), _staff(scenario, config, fid, a))
            for a, b in pairwise(edges)]


def _staff(scenario: Scenario, config: RouterConfig, fid: str, t: float) -> float:
    default = config.forces[fid].centre.handlers_on_duty
    return float(handlers_at(scenario, fid, t, default) - truth_at(scenario, fid, t).external_aid)


def _load(scenario: Scenario, fid: str, t: float) -> float:
    factor = truth_at(scenario, fid, t).handling_factor
    return sum(_rate_at(scenario, fid, s, t) / 3600 * scenario.handling[s].mean_s * factor
               for s in Service)


def _rate_at(scenario: Scenario, fid: str, service: Service, t: float) -> float:
    return next((r for a, b, r in rate_segments(scenario, fid, service) if a <= t < b), 0.0)
