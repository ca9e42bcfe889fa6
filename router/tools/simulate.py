"""`overflow-router simulate`: how long 999 callers wait on a bad night, with our rules, by
hand, and with no diversion at all.

A discrete-event simulation in virtual time (router/tools/sim/): callers arrive by time of day,
queue at a centre's handlers (999 ahead of 101), are answered or give up and call again; the
scenario says what really fails when. Three strategies meet the very same callers:

- `overflow-router`: the real policy, ledger and per-centre health state machine, fed by
  probes, telemetry and declarations in virtual time, so detection delay, overload from load
  and the recovery ramp are in the result;
- `manual`: diversion by hand, all of a failed force's calls to its partners after a delay,
  without caps, until some time after its phones are back;
- `none`: every call goes home, answered or not.

The same seed always gives the same report.
"""

from __future__ import annotations

from collections.abc import Iterable

from router.config import RouterConfig
from router.tools.sim.callers import generate
from router.tools.sim.html import render as render_html
from router.tools.sim.report import Report
from router.tools.sim.run import STRATEGIES, run
from router.tools.sim.scenario import HandlingTime, Patience, Scenario, load_scenario
from router.tools.sim.sweep import Sweep, SweepError, apply, summarise
from router.tools.sim.sweep import parse as parse_sweep
from router.tools.sim.sweep import table as sweep_table
from router.tools.sim.truth import load_warnings

__all__ = ["STRATEGIES", "HandlingTime", "Patience", "Report", "Scenario", "SweepError",
           "load_scenario", "parse_sweep", "render_html", "simulate", "sweep", "sweep_table"]


def simulate(config: RouterConfig, scenario: Scenario, seed: int = 0,
             strategies: Iterable[str] = tuple(STRATEGIES)) -> Report:
    """One night under each strategy, all facing the same callers."""
    callers = generate(scenario, seed)
    outcomes = {name: run(config, scenario, seed, name, callers) for name in strategies}
    return Report(scenario, config, seed, load_warnings(scenario, config), outcomes)


def sweep(config: RouterConfig, scenario: Scenario, what: Sweep, seeds: list[int],
          strategies: Iterable[str] = tuple(STRATEGIES)) -> dict[str, object]:
    """Each value of the swept key over every seed; raises SweepError naming a bad key."""
    names = list(strategies)
    settings = {value: apply(config, scenario, what.key, value) for value in what.values}
    runs = {value: [simulate(cfg, sc, seed, names) for seed in seeds]
            for value, (cfg, sc) in settings.items()}
    return summarise(what, seeds, runs)
