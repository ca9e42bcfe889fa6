"""The virtual-time simulator: deterministic, conserving calls, honest about caps, and driving
the engine through the same states (and recovery ramp) the live watcher would report."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from configs.builder import config, force

from router.config import ConfigError, RouterConfig, load_config
from router.engine.model import CentreState, Service
from router.tools.simulate import HandlingTime, Report, Scenario, Timeline, load_scenario, simulate

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = load_config(ROOT / "config" / "forces.yaml")
MET_OUTAGE = ROOT / "scenarios" / "met-outage-2025-03-25.yaml"


def scenario(tmp_path: Path, cfg: RouterConfig, **fields: Any) -> Scenario:
    doc = {"name": "test", "duration_s": 3600,
           "handling": {"999": {"mean_s": 120}, "101": {"mean_s": 180}},
           "arrivals": {}, **fields}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_scenario(path, cfg)


def row(report: Report, force_id: str, service: str) -> Any:
    return next(r for r in report.rows if (r.force, r.service) == (force_id, service))


def test_bundled_scenario_is_valid_and_deterministic() -> None:
    sc = load_scenario(MET_OUTAGE, BUNDLED)
    first = simulate(BUNDLED, sc, seed=7).to_json()
    assert simulate(BUNDLED, sc, seed=7).to_json() == first
    assert simulate(BUNDLED, sc, seed=8).to_json() != first


def test_every_call_is_accounted_for_and_caps_hold() -> None:
    sc = load_scenario(MET_OUTAGE, BUNDLED)
    report = simulate(BUNDLED, sc, seed=1)
    assert report.calls == sum(r.offered for r in report.rows)
    for r in report.rows:
        assert r.offered == r.home + sum(r.overflowed.values()) + r.last_resort + r.shed
    anywhere_last_resort = any(r.last_resort for r in report.rows)
    for r in report.rows:
        if r.service == "101" or not anywhere_last_resort:
            assert r.peak_aid_in_flight <= r.aid_cap  # only last_resort may go beyond a cap
        if r.service == "101":
            assert r.last_resort == 0
        else:
            assert r.shed == 0  # a 999 is never shed


def test_met_outage_overflows_met_calls_to_its_partners() -> None:
    sc = load_scenario(MET_OUTAGE, BUNDLED)
    report = simulate(BUNDLED, sc, seed=1)
    met999 = row(report, "met", "999")
    partners = {r.to for r in BUNDLED.forces["met"].overflow[Service.EMERGENCY]}
    assert set(met999.overflowed) == partners
    down = next(e for e in sc.timeline if e.force == "met")
    assert down.to_s is not None
    # about the outage's share of the Met's 999 calls overflowed (Poisson: allow 5 sigma)
    expected = sc.arrivals["met"][Service.EMERGENCY] * (down.to_s - down.from_s) / 3600
    assert abs(sum(met999.overflowed.values()) + met999.last_resort - expected) \
        <= 5 * math.sqrt(expected) + sc.arrivals["met"][Service.EMERGENCY] / 60
    # forces that stayed normal kept all their own calls
    for fid in ("sussex", "tvp", "herts", "essex", "surrey"):
        for service in ("999", "101"):
            r = row(report, fid, service)
            assert r.home == r.offered > 0


def test_arrivals_follow_the_scenario_rates(tmp_path: Path) -> None:
    sc = scenario(tmp_path, BUNDLED, duration_s=7200,
                  arrivals={"kent": {"999": 300, "101": 100}, "met": {"999": 0}})
    report = simulate(BUNDLED, sc, seed=3)
    for service, per_hour in (("999", 300), ("101", 100)):
        mean = per_hour * sc.duration_s / 3600
        assert abs(row(report, "kent", service).offered - mean) <= 5 * math.sqrt(mean)
    assert row(report, "met", "999").offered == 0


@pytest.mark.parametrize("distribution", ["exponential", "lognormal", "fixed"])
def test_handling_time_has_the_configured_mean(distribution: str) -> None:
    h = HandlingTime(distribution=distribution, mean_s=240, sigma=0.6)  # type: ignore[arg-type]
    rng = random.Random(5)
    draws = [h.draw(rng) for _ in range(20_000)]
    mean = sum(draws) / len(draws)
    sd = math.sqrt(sum((d - mean) ** 2 for d in draws) / len(draws))
    assert abs(mean - h.mean_s) <= 5 * sd / math.sqrt(len(draws)) + 1e-9
    assert min(draws) > 0


def test_timeline_reports_recovering_with_since_then_normal(tmp_path: Path) -> None:
    sc = scenario(tmp_path, BUNDLED, timeline=[
        {"force": "met", "state": "down", "from_s": 100, "to_s": 400},
        {"force": "kent", "cad_up": False, "from_s": 200},
    ])
    tl = Timeline(sc, BUNDLED)
    ramp_s = len(BUNDLED.health.recovery.ramp) * BUNDLED.health.recovery.step_s
    assert tl.changes() == [0.0, 100.0, 200.0, 400.0, 400.0 + ramp_s]
    assert tl.view("met", 99.9).state is CentreState.NORMAL
    assert tl.view("met", 100).state is CentreState.DOWN
    back = tl.view("met", 400 + ramp_s / 2)
    assert (back.state, back.since) == (CentreState.RECOVERING, 400.0)
    assert tl.view("met", 400 + ramp_s).state is CentreState.NORMAL
    assert not tl.view("kent", 3000).cad_up and tl.view("kent", 3000).state is CentreState.NORMAL


def test_recovery_ramp_returns_calls_home_gradually(tmp_path: Path) -> None:
    cfg = config(force("aa", handlers=500, max_queue=500, routes_999=[("bb", 1)],
                       routes_101=[("bb", 1)]),
                 force("bb", handlers=500, max_queue=500, aid_max=500, aid_queue_below=500,
                       routes_999=[("aa", 1)], routes_101=[("aa", 1)]),
                 ramp=(0.25, 1.0), step_s=600)
    # down until t=600, then one 600 s ramp step at 25 %, then home again
    common = {"duration_s": 1800, "arrivals": {"aa": {"999": 3600}},
              "handling": {"999": {"distribution": "fixed", "mean_s": 1},
                           "101": {"mean_s": 60}}}
    down = scenario(tmp_path, cfg, **common,
                    timeline=[{"force": "aa", "state": "down", "from_s": 0, "to_s": 600}])
    r = row(simulate(cfg, down, seed=2), "aa", "999")
    # a third of the time down (nothing home), a third at 25 %, a third at 100 %
    expected_home = r.offered * (0 + 0.25 + 1.0) / 3
    assert abs(r.home - expected_home) <= 5 * math.sqrt(r.offered)
    no_ramp = scenario(tmp_path, cfg, **common, timeline=[
        {"force": "aa", "state": "down", "from_s": 0, "to_s": 600, "recover": False}])
    r2 = row(simulate(cfg, no_ramp, seed=2), "aa", "999")
    assert r2.offered == r.offered and r2.home > r.home


def test_overloaded_partner_takes_no_aid_during_its_episode(tmp_path: Path) -> None:
    sc = scenario(tmp_path, BUNDLED, arrivals={"met": {"999": 600}}, timeline=[
        {"force": "met", "state": "down", "from_s": 0},
        {"force": "kent", "state": "overloaded", "from_s": 0},
    ])
    met = row(simulate(BUNDLED, sc, seed=4), "met", "999")
    assert "kent" not in met.overflowed and sum(met.overflowed.values()) > 0
    assert met.home == 0


def test_scenario_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "duration_s: 600\n"
        "handling:\n"
        "  '999': {mean_s: 60}\n"
        "  '101': {mean_s: 60, distribution: gamma}\n"
        "arrivals:\n"
        "  gotham: {'999': 5}\n"
        "timeline:\n"
        "  - {force: met, from_s: 10, to_s: 5, state: down}\n"
        "  - {force: met, from_s: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_scenario(path, BUNDLED)
    assert str(err.value).splitlines() == [
        f"{path}:5: handling.101.distribution: must be 'exponential', 'lognormal' or 'fixed' "
        "(got 'gamma')",
        f"{path}:9: timeline[0].to_s: 5.0 is not after from_s 10.0",
        f"{path}:10: timeline[1]: changes nothing: give state, telephony_up or cad_up",
    ]
    path.write_text("name: bad\nduration_s: 600\nhandling: {'999': {mean_s: 60}, "
                    "'101': {mean_s: 60}}\narrivals:\n  gotham: {'999': 5}\n"
                    "timeline:\n  - {force: met, from_s: 900, state: down}\n")
    with pytest.raises(ConfigError) as err:
        load_scenario(path, BUNDLED)
    known = ", ".join(sorted(BUNDLED.forces))
    assert str(err.value).splitlines() == [
        f"{path}:5: arrivals.gotham: unknown force 'gotham' (known: {known})",
        f"{path}:7: timeline[0].from_s: starts after the scenario ends (600 s)",
    ]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "simulate", *args], cwd=ROOT,
                          text=True, capture_output=True, timeout=60, check=False)


def test_cli_simulate_table_and_json() -> None:
    base = ("--config", "config/forces.yaml", "--scenario", str(MET_OUTAGE.relative_to(ROOT)),
            "--seed", "3")
    table = cli(*base)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "seed 3" in lines[0] and lines[1].split()[:3] == ["force", "svc", "offered"]
    assert {line.split()[0] for line in lines[2:]} == set(BUNDLED.forces)
    as_json = cli(*base, "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    direct = simulate(BUNDLED, load_scenario(MET_OUTAGE, BUNDLED), seed=3).to_json()
    assert report == json.loads(json.dumps(direct))


def test_cli_simulate_refuses_a_bad_scenario(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nduration_s: 60\nhandling: {}\narrivals: {}\nspeed: 11\n")
    out = cli("--config", "config/forces.yaml", "--scenario", str(path))
    assert out.returncode == 2
    assert f"{path}:5: speed: unknown key" in out.stderr
