"""The report: per strategy, force and service, what callers got — offered, answered (at home
and by each partner), abandoned, shed, answer times, the share of calls answered within 10 s
and the worst 15 minutes — what partners carried against their caps, and how soon the routing
noticed each failure; region-wide too. As JSON (`to_json`) or text tables (`table`).

Answer times are those of answered calls, from the moment the call (each redial its own call)
was routed to a handler answering it; the share within 10 s is of every call offered, so a
caller who gave up, heard a dead line or an announcement counts against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from router.config import RouterConfig
from router.engine.model import Service
from router.tools.sim.run import Outcome
from router.tools.sim.scenario import Scenario, clock_at
from router.tools.sim.tally import BIN_S, WITHIN_S, Tally

WINDOW_BINS = 15  # minutes in the worst window
WINDOW_MIN_CALLS = 10  # quieter windows say little
TARGET = 0.9  # of 999 calls answered within 10 s


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest rank, of an already sorted list."""
    if not ordered:
        return None
    return ordered[min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)]


def service_json(scenario: Scenario, tallies: list[Tally]) -> dict[str, Any]:
    """One service over `tallies` (one force's, or every force's for the region)."""
    offered = sum(t.offered for t in tallies)
    at_home = sum(t.answered_by.get(t.force, 0) for t in tallies)
    by: dict[str, int] = {}
    for t in tallies:
        for dest, n in t.answered_by.items():
            if dest != t.force:
                by[dest] = by.get(dest, 0) + n
    waits = sorted(w for t in tallies for w in t.waits)

    def share(n: int) -> float | None:
        return round(n / offered, 4) if offered else None

    return {
        "offered": offered, "answered": sum(t.answered for t in tallies),
        "answered_home": at_home,
        "answered_by": dict(sorted(by.items(), key=lambda kv: -kv[1])),
        "abandoned": sum(t.abandoned for t in tallies),
        "dead_line": sum(t.dead_line for t in tallies),
        "shed": sum(t.shed for t in tallies),
        "queued_at_end": sum(t.queued_at_end for t in tallies),
        "repeats": sum(t.repeats for t in tallies),
        "last_resort": sum(t.last_resort for t in tallies),
        "waited_share": share(sum(t.waited for t in tallies)),
        "within_10s_share": share(sum(t.within for t in tallies)),
        "answer_s": {"p50": _r(percentile(waits, 0.5)), "p90": _r(percentile(waits, 0.9)),
                     "p99": _r(percentile(waits, 0.99)),
                     "mean": _r(sum(waits) / len(waits) if waits else None)},
        "worst_15min": worst_window(scenario, tallies),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def worst_window(scenario: Scenario, tallies: list[Tally]) -> dict[str, Any] | None:
    """The 15 minutes (sliding by the minute, by when calls came) with the lowest share
    answered within 10 s, among those with enough calls to mean something."""
    minutes = math.ceil(scenario.duration_s / BIN_S)
    offered, within = [0], [0]  # running sums
    for i in range(minutes):
        offered.append(offered[-1] + sum(t.offered_bins[i] for t in tallies))
        within.append(within[-1] + sum(t.within_bins[i] for t in tallies))
    worst: tuple[float, int, int] | None = None
    for start in range(max(minutes - WINDOW_BINS, 0) + 1):
        stop = min(start + WINDOW_BINS, minutes)
        o, w = offered[stop] - offered[start], within[stop] - within[start]
        if o >= WINDOW_MIN_CALLS and (worst is None or w / o < worst[0]):
            worst = (w / o, start, o)
    if worst is None:
        return None
    share, start, calls = worst
    return {"from": clock_at(scenario, start * BIN_S),
            "to": clock_at(scenario, min((start + WINDOW_BINS) * BIN_S, scenario.duration_s)),
            "within_10s_share": round(share, 4), "offered": calls}


def outcome_json(config: RouterConfig, scenario: Scenario, o: Outcome) -> dict[str, Any]:
    forces: dict[str, Any] = {}
    for fid, centre in o.centres.items():
        forces[fid] = {s.value: service_json(scenario, [o.tallies[(fid, s)]]) for s in Service}
        forces[fid]["aid"] = {"cap": centre.aid_cap, "peak": centre.aid_peak,
                              "over_cap_s": round(centre.over_cap_s, 1)}
        forces[fid]["outages"] = [x.as_json() for x in o.outages if x.force == fid]
    region: dict[str, Any] = {s.value: service_json(
        scenario, [o.tallies[(fid, s)] for fid in o.centres]) for s in Service}
    region["aid_over_cap_s"] = round(sum(c.over_cap_s for c in o.centres.values()), 1)
    return {"region": region, "forces": forces, "calls": o.calls, "events": o.events}


@dataclass
class Report:
    scenario: Scenario
    config: RouterConfig
    seed: int
    warnings: list[str]
    outcomes: dict[str, Outcome]

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        return {"scenario": sc.name, "start": sc.start, "duration_s": sc.duration_s,
                "seed": self.seed, "within_s": WITHIN_S, "warnings": self.warnings,
                "strategies": {name: outcome_json(self.config, sc, o)
                               for name, o in self.outcomes.items()}}

    def table(self, data: dict[str, Any] | None = None) -> str:
        data = data or self.to_json()
        sc = self.scenario
        lines = [f"{sc.name} — seed {self.seed}, {sc.duration_s / 3600:.2f} h virtual from "
                 f"{sc.start}, strategies: {', '.join(data['strategies'])}"]
        lines += [f"warning: {w}" for w in data["warnings"]]
        for name, result in data["strategies"].items():
            lines += ["", f"== {name} ({result['calls']} calls) ==", _HEAD]
            for fid, force in result["forces"].items():
                lines += [_row(fid, s.value, force[s.value]) for s in Service]
            lines += [_row("region", s.value, result["region"][s.value]) for s in Service]
        lines += ["", "calls carried for other forces (peak / cap, time over cap):",
                  f"{'force':8} " + " ".join(f"{n:>22}" for n in data["strategies"])]
        for fid in self.config.forces:
            cells = []
            for result in data["strategies"].values():
                aid = result["forces"][fid]["aid"]
                cells.append(f"{aid['peak']:>4}/{aid['cap']:<4} {_dur(aid['over_cap_s']):>12}")
            lines.append(f"{fid:8} " + " ".join(f"{c:>22}" for c in cells))
        lines += ["", "failures and how soon the routing acted (after the failure / after the "
                  "repair):"]
        for name, result in data["strategies"].items():
            for fid, force in result["forces"].items():
                for x in force["outages"]:
                    lines.append(f"  {name:15} {fid:8} {x['component']:9} from "
                                 f"{clock_at(sc, x['from_s'])} to "
                                 f"{clock_at(sc, x['to_s']) if x['to_s'] is not None else 'end'}"
                                 f": acted after {_dur(x['detected_after_s'])}, home again "
                                 f"after {_dur(x['restored_after_s'])}")
        lines += ["", summary(data)]
        return "\n".join(lines)


def summary(data: dict[str, Any]) -> str:
    """One line: does the region meet 90% of 999 within 10 s under each strategy?"""
    parts = []
    for name, result in data["strategies"].items():
        share = result["region"]["999"]["within_10s_share"]
        verdict = "n/a" if share is None else (
            f"{share:.1%} ({'meets' if share >= TARGET else 'misses'} {TARGET:.0%})")
        parts.append(f"{name} {verdict}")
    return "999 answered within 10 s across the region: " + "; ".join(parts)


_HEAD = (f"{'force':8} {'svc':>3} {'offered':>7} {'answered':>8} {'home':>6} {'aband':>6} "
         f"{'dead':>5} {'shed':>5} {'queued':>6} {'p50 s':>6} {'p90 s':>6} {'p99 s':>6} "
         f"{'<=10s':>6}  {'worst 15 min':18}  answered by partners")


def _row(fid: str, service: str, s: dict[str, Any]) -> str:
    a = s["answer_s"]
    worst = s["worst_15min"]
    worst_text = f"{worst['from']} {worst['within_10s_share']:.0%}" if worst else "-"
    partners = " ".join(f"{p}:{n}" for p, n in s.get("answered_by", {}).items()) or "-"
    return (f"{fid:8} {service:>3} {s['offered']:>7} {s['answered']:>8} "
            f"{s['answered_home']:>6} {s['abandoned']:>6} {s['dead_line']:>5} {s['shed']:>5} "
            f"{s['queued_at_end']:>6} {_num(a['p50']):>6} {_num(a['p90']):>6} "
            f"{_num(a['p99']):>6} {_pct(s['within_10s_share']):>6}  {worst_text:18}  {partners}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"
