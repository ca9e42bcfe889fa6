"""Simulator speed: a 12-hour night of the eight bundled forces at realistic volumes.

`python -m bench sim [--seed N] [--repeat N]`

The night runs 19:00-07:00 at the 25 March 2025 scenario's rates (scenarios/
met-outage-2025-03-25.yaml, the Met at 750 999 and 350 101 calls an hour at 21:00) under a
time-of-day profile that rises to the late evening and falls through the small hours, with
that night's Met failure (phones 21:36-22:28, CAD until 00:05). Timed: drawing the callers,
then each strategy's run (the real router with its probes and telemetry, by hand, none),
CPU time of this process (one core) and wall time, best of `--repeat`. Target (issue 13): the
whole night, all three strategies, under 10 s of wall time on one core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from router.config import load_config
from router.tools.sim.callers import generate
from router.tools.sim.run import STRATEGIES, run
from router.tools.sim.scenario import Scenario, load_scenario

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "config" / "forces.yaml"
EVENING = ROOT / "scenarios" / "met-outage-2025-03-25.yaml"
TARGET_S = 10.0
NIGHT_PROFILE = (("19:00", 0.85), ("20:00", 0.95), ("21:00", 1.0), ("23:00", 0.9),
                 ("00:00", 0.8), ("01:00", 0.7), ("02:00", 0.55), ("03:00", 0.4),
                 ("05:00", 0.35), ("06:00", 0.5))


def night(evening: Scenario) -> Scenario:
    """The evening scenario stretched to 19:00-07:00, its failures two hours later."""
    shift = 2 * 3600.0
    doc = evening.model_dump(mode="json")
    doc.update(name="a 12-hour night (19:00-07:00) with the 25 March Met failure",
               start="19:00", duration_s=12 * 3600.0,
               profile=[{"at": at, "factor": f} for at, f in NIGHT_PROFILE])
    for episode in doc["timeline"]:
        episode["from_s"] += shift
        if episode["to_s"] is not None:
            episode["to_s"] += shift
    return Scenario.model_validate(doc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="passes (best kept)")
    args = parser.parse_args(argv)
    cfg = load_config(BUNDLED)
    sc = night(load_scenario(EVENING, cfg))
    print(f"{sc.name}: {len(cfg.forces)} forces, seed {args.seed}, best of {args.repeat}")
    best: dict[str, tuple[float, float, int, int]] = {}  # part: cpu s, wall s, calls, events
    for _ in range(args.repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        callers = generate(sc, args.seed)
        parts = {"callers": (time.process_time() - c0, time.perf_counter() - w0,
                             len(callers), 0)}
        for name in STRATEGIES:
            c0, w0 = time.process_time(), time.perf_counter()
            outcome = run(cfg, sc, args.seed, name, callers)
            parts[name] = (time.process_time() - c0, time.perf_counter() - w0, outcome.calls,
                           outcome.events)
        for part, figures in parts.items():
            if part not in best or figures[1] < best[part][1]:
                best[part] = figures
    print(f"{'part':16} {'CPU s':>7} {'wall s':>7} {'calls':>8} {'events':>9} {'events/s':>10}")
    for part, (cpu, wall, calls, events) in best.items():
        rate = f"{events / cpu:>10,.0f}" if events and cpu else f"{'-':>10}"
        print(f"{part:16} {cpu:>7.2f} {wall:>7.2f} {calls:>8,} {events:>9,} {rate}")
    cpu = sum(b[0] for b in best.values())
    wall = sum(b[1] for b in best.values())
    verdict = "met" if wall < TARGET_S else "MISSED"
    print(f"{'whole night':16} {cpu:>7.2f} {wall:>7.2f}   target < {TARGET_S:g} s wall: {verdict}")
    return 0 if wall < TARGET_S else 1
