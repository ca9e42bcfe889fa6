"""The caller-outcome simulator: deterministic, conserving every call, right against queueing
theory (Erlang C and Erlang A), and honest in its report, its page, its sweeps and its errors.

Short runs everywhere except the two queueing-theory checks, which need long ones to get
within 2% (Erlang C) and 5% (Erlang A); they pool a few seeds to keep memory small.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from configs.builder import config, force

from router.config import ConfigError, RouterConfig, load_config
from router.engine.model import Service
from router.tools.simulate import (
    STRATEGIES,
    Report,
    Scenario,
    load_scenario,
    parse_sweep,
    simulate,
    sweep,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_PATH = ROOT / "config" / "forces.yaml"
BUNDLED = load_config(BUNDLED_PATH)
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
MET_OUTAGE = ROOT / "scenarios" / "met-outage-2025-03-25.yaml"
SERVICES = ("999", "101")


@cache
def bundled_report(name: str, seed: int = 1) -> Report:
    """Each bundled scenario run once per seed for the whole module (each takes under 1 s)."""
    return simulate(BUNDLED, load_scenario(ROOT / "scenarios" / name, BUNDLED), seed)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "simulate", *args], cwd=ROOT,
                          text=True, capture_output=True, timeout=120, check=False)


def short_scenario(**fields: Any) -> dict[str, Any]:
    """A one-hour night for the bundled forces: quick, with a Met outage in the middle."""
    doc: dict[str, Any] = {
        "name": "short", "start": "21:00", "duration_s": 3600,
        "handling": {"999": {"mean_s": 270}, "101": {"mean_s": 360}},
        "patience": {"999": {"mean_s": 120}, "101": {"mean_s": 300}},
        "repeat": {"999": {"probability": 0.8, "mean_delay_s": 45}},
        "arrivals": {"met": {"999": 450, "101": 350}, "kent": {"999": 90, "101": 110},
                     "essex": {"999": 85, "101": 100}},
        "timeline": [{"force": "met", "from_s": 600, "to_s": 2400, "telephony_up": False,
                      "telemetry": "silent"}],
        "manual": {"delay_s": 300, "return_delay_s": 300},
    }
    doc.update(fields)
    return doc


def write(tmp_path: Path, doc: dict[str, Any], name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- determinism and conservation --------------------------------------------------------


def test_same_seed_same_report_and_another_seed_another() -> None:
    sc = load_scenario(MET_OUTAGE, BUNDLED)
    first = bundled_report(MET_OUTAGE.name).to_json()
    assert simulate(BUNDLED, sc, 1).to_json() == first
    assert simulate(BUNDLED, sc, 2).to_json() != first


def test_strategies_meet_the_same_first_callers() -> None:
    """Common random numbers: every strategy faces the very same first calls, so a difference
    in outcome comes from routing (repeat calls differ, as the outcomes do)."""
    data = bundled_report(MET_OUTAGE.name).to_json()["strategies"]
    for fid in BUNDLED.forces:
        for svc in SERVICES:
            firsts = {name: s["forces"][fid][svc]["offered"] - s["forces"][fid][svc]["repeats"]
                      for name, s in data.items()}
            assert len(set(firsts.values())) == 1, (fid, svc, firsts)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_loads_runs_and_conserves_calls(path: Path) -> None:
    """offered = answered + abandoned + shed + still queued at the end, for every force,
    service and strategy, and for the region; answered = at home + by each partner."""
    assert len(SCENARIOS) >= 4
    data = bundled_report(path.name).to_json()
    assert set(data["strategies"]) == set(STRATEGIES)
    for name, result in data["strategies"].items():
        blocks = [(fid, result["forces"][fid]) for fid in BUNDLED.forces]
        for fid, block in [*blocks, ("region", result["region"])]:
            for svc in SERVICES:
                s = block[svc]
                assert s["offered"] > 0, (name, fid, svc)
                assert s["offered"] == (s["answered"] + s["abandoned"] + s["shed"]
                                        + s["queued_at_end"]), (name, fid, svc, s)
                assert s["answered"] == s["answered_home"] + sum(s["answered_by"].values())
                assert s["dead_line"] <= s["abandoned"]
        for svc in SERVICES:
            assert result["region"][svc]["offered"] == sum(
                result["forces"][fid][svc]["offered"] for fid in BUNDLED.forces)
        if name == "overflow-router":  # 999 never shed; caps held while no last resort
            assert result["region"]["999"]["shed"] == 0
            if result["region"]["999"]["last_resort"] == 0:
                for fid in BUNDLED.forces:
                    aid = result["forces"][fid]["aid"]
                    assert aid["peak"] <= aid["cap"] and aid["over_cap_s"] == 0, (fid, aid)


# ---- what the scenarios show -------------------------------------------------------------


def test_25_march_the_router_acts_in_seconds_and_by_hand_in_minutes() -> None:
    data = bundled_report(MET_OUTAGE.name).to_json()["strategies"]
    router_out = data["overflow-router"]["forces"]["met"]["outages"]
    phones = next(x for x in router_out if x["component"] == "telephony")
    # probes every 0.25 s, three failures: about a second, from the real state machine
    assert 0.3 < phones["detected_after_s"] < 3
    manual = next(x for x in data["manual"]["forces"]["met"]["outages"])
    assert manual["detected_after_s"] == 600
    assert data["none"]["forces"]["met"]["outages"] == []
    met = {name: s["forces"]["met"]["999"] for name, s in data.items()}
    # with no diversion the Met's callers meet a dead line for the whole outage
    assert met["none"]["dead_line"] > 500 and met["none"]["answered_by"] == {}
    assert met["overflow-router"]["dead_line"] < met["manual"]["dead_line"] < \
        met["none"]["dead_line"]
    partners = {r.to for r in BUNDLED.forces["met"].overflow[Service.EMERGENCY]}
    assert set(met["overflow-router"]["answered_by"]) == partners
    share = {name: s["region"]["999"]["within_10s_share"] for name, s in data.items()}
    assert share["overflow-router"] > share["manual"] > share["none"]


def test_a_partner_at_its_cap_gets_nothing_more_from_the_router() -> None:
    data = bundled_report("partner-at-cap.yaml").to_json()["strategies"]
    kent = {name: s["forces"]["kent"]["aid"] for name, s in data.items()}
    assert kent["overflow-router"]["peak"] == kent["overflow-router"]["cap"] == 20
    assert kent["overflow-router"]["over_cap_s"] == 0
    assert kent["manual"]["over_cap_s"] > 0  # by hand, Kent still got its share
    calm = bundled_report(MET_OUTAGE.name).to_json()["strategies"]["overflow-router"]
    by_kent = data["overflow-router"]["forces"]["met"]["999"]["answered_by"].get("kent", 0)
    assert by_kent < calm["forces"]["met"]["999"]["answered_by"]["kent"] / 2


def test_two_forces_down_the_router_finds_both() -> None:
    data = bundled_report("two-forces-down.yaml").to_json()["strategies"]
    found = {x["force"]: x for x in data["overflow-router"]["forces"]["kent"]["outages"]}
    assert found["kent"]["detected_after_s"] < 3
    router_met = data["overflow-router"]["forces"]["met"]["999"]
    manual_met = data["manual"]["forces"]["met"]["999"]
    # the router stops sending Met calls to Kent while Kent is down; by hand they keep going
    assert router_met["dead_line"] < manual_met["dead_line"]


def test_a_surge_beyond_the_handlers_is_warned_about() -> None:
    report = bundled_report("met-outage-surge.yaml")
    assert any(w.startswith("met: offered load") and "120 handlers" in w
               for w in report.warnings)
    assert not bundled_report(MET_OUTAGE.name).warnings


def test_warning_when_offered_load_exceeds_the_handlers() -> None:
    cfg = config(force("alpha", handlers=5))
    doc = {"name": "busy", "duration_s": 600, "start": "10:00",
           "handling": {"999": {"mean_s": 300}, "101": {"mean_s": 300}},
           "arrivals": {"alpha": {"999": 48, "101": 24}}}  # 6 Erlangs on 5 handlers
    report = simulate(cfg, Scenario.model_validate(doc), 0, ["none"])
    assert len(report.warnings) == 2  # the centre, and the region as a whole
    assert "alpha: offered load 6.0 Erlangs reaches its 5 handlers 10:00-10:10" in \
        report.warnings[0]
    doc["arrivals"] = {"alpha": {"999": 24, "101": 12}}
    assert simulate(cfg, Scenario.model_validate(doc), 0, ["none"]).warnings == []


def test_standby_routes_are_used_by_hand_only_when_nothing_else_is() -> None:
    cfg = config(force("alpha", routes_999=[("beta", 1), ("gamma", 0)]),
                 force("beta"), force("gamma"),
                 force("delta", routes_999=[("gamma", 0)]))
    doc = {"name": "standby", "duration_s": 1800,
           "handling": {"999": {"mean_s": 60}, "101": {"mean_s": 60}},
           "arrivals": {"alpha": {"999": 120}, "delta": {"999": 120}},
           "timeline": [{"force": "alpha", "from_s": 60, "telephony_up": False},
                        {"force": "delta", "from_s": 60, "telephony_up": False}],
           "manual": {"delay_s": 60}}
    data = simulate(cfg, Scenario.model_validate(doc), 3, ["manual"]).to_json()
    forces = data["strategies"]["manual"]["forces"]
    assert set(forces["alpha"]["999"]["answered_by"]) == {"beta"}
    assert set(forces["delta"]["999"]["answered_by"]) == {"gamma"}


# ---- queueing theory -----------------------------------------------------------------------


def erlang_c(c: int, lam: float, mu: float, t: float = 10.0) -> dict[str, float]:
    """M/M/c: probability of waiting, mean wait, share answered within t."""
    a, b = lam / mu, 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)  # Erlang B, by its recursion
    wait = c * b / (c - a * (1 - b))
    return {"wait": wait, "mean": wait / (c * mu - lam),
            "within": 1 - wait * math.exp(-(c * mu - lam) * t)}


def erlang_a(c: int, lam: float, mu: float, theta: float, t: float = 10.0) -> dict[str, float]:
    """M/M/c+M, from its birth-death chain (n in the system: births lam, deaths
    min(n, c) mu + (n - c)+ theta), by arrivals' eyes (PASTA): the probabilities of waiting and
    of abandoning, the mean answer time of those answered, and the share answered within t."""
    p = [1.0]
    while len(p) <= c or p[-1] > 1e-15 * sum(p):
        n = len(p)
        p.append(p[-1] * lam / (min(n, c) * mu + max(n - c, 0) * theta))
    pi = [x / sum(p) for x in p]
    ahead = pi[c:]  # an arrival finds j = 0, 1, ... callers waiting before it
    abandon = sum(q * j * theta for j, q in enumerate(ahead)) / lam
    answered_wait = 0.0  # E[wait; answered]: with i ahead, the next event comes at rate r_i
    for j, q in enumerate(ahead):
        ok, mean = 1.0, 0.0
        for i in range(j, -1, -1):
            rate = c * mu + (i + 1) * theta
            ok *= (c * mu + i * theta) / rate
            mean += 1 / rate
        answered_wait += q * ok * mean
    # share answered within t: the tagged caller's chain (i ahead) stepped through time
    dt, got, prob = 0.002, 0.0, list(ahead)
    for _ in range(round(t / dt)):
        nxt = [0.0] * len(prob)
        for i, q in enumerate(prob):
            move = (c * mu + i * theta) * dt
            nxt[i] += q * (1 - move - theta * dt)
            if i:
                nxt[i - 1] += q * move
            else:
                got += q * move
        prob = nxt
    return {"wait": sum(ahead), "abandon": abandon, "mean": answered_wait / (1 - abandon),
            "within": 1 - sum(ahead) + got}


def pooled(c: int, mean_s: float, per_hour: float, duration_s: float, seeds: range,
           patience_s: float | None = None) -> dict[str, float]:
    """One centre, 999 only, exponential handling (and patience), no redials, no diversion:
    the measured counterparts of the formulas, pooled over `seeds`."""
    cfg = config(force("alpha", handlers=c, overflow_queue=10_000, max_queue=10_000))
    doc: dict[str, Any] = {
        "name": "queueing theory", "duration_s": duration_s, "sample_s": 3600,
        "handling": {"999": {"distribution": "exponential", "mean_s": mean_s},
                     "101": {"mean_s": mean_s}},
        "arrivals": {"alpha": {"999": per_hour}}}
    if patience_s is not None:
        doc["patience"] = {"999": {"distribution": "exponential", "mean_s": patience_s}}
    sc = Scenario.model_validate(doc)
    offered = waited = within = abandoned = answered = 0
    waits = 0.0
    for seed in seeds:
        t = simulate(cfg, sc, seed, ["none"]).outcomes["none"].tallies[("alpha",
                                                                         Service.EMERGENCY)]
        assert t.offered == t.answered + t.abandoned + t.shed + t.queued_at_end
        offered += t.offered
        waited += t.waited
        within += t.within
        abandoned += t.abandoned
        answered += t.answered
        waits += sum(t.waits)
    return {"wait": waited / offered, "mean": waits / answered, "within": within / offered,
            "abandon": abandoned / offered, "offered": offered}


def test_mmc_matches_erlang_c_within_2_percent() -> None:
    """M/M/2 at 50% load (mean handling 20 s), about 700,000 calls: probability of waiting,
    mean wait and share answered within 10 s each within 2% of Erlang C."""
    mean_s, per_hour, c = 20.0, 180.0, 2
    got = pooled(c, mean_s, per_hour, 3_500_000, range(4))
    want = erlang_c(c, per_hour / 3600, 1 / mean_s)
    assert got["offered"] > 650_000
    for key in ("wait", "mean", "within"):
        assert got[key] == pytest.approx(want[key], rel=0.02), (key, got, want)


def test_mmc_with_impatient_callers_matches_erlang_a_within_5_percent() -> None:
    """M/M/10+M at 100% offered load, patience 60 s on average, about 200,000 calls: the
    probabilities of waiting and of abandoning, the mean answer time and the share answered
    within 10 s each within 5% of Erlang A."""
    c, mean_s, patience_s = 10, 60.0, 60.0
    per_hour = c / mean_s * 3600  # 10 Erlangs on 10 handlers: only abandonment keeps it stable
    got = pooled(c, mean_s, per_hour, 600_000, range(2), patience_s)
    want = erlang_a(c, per_hour / 3600, 1 / mean_s, 1 / patience_s)
    assert got["offered"] > 190_000
    assert want["abandon"] > 0.1  # enough callers give up for the check to mean something
    for key in ("wait", "abandon", "mean", "within"):
        assert got[key] == pytest.approx(want[key], rel=0.05), (key, got, want)


def test_erlang_a_without_patience_is_erlang_c() -> None:
    """The test's own Erlang A (the chain) agrees with the closed form as patience grows."""
    a = erlang_a(3, 0.1, 0.05, 1e-9)
    c = erlang_c(3, 0.1, 0.05)
    for key in ("wait", "mean", "within"):
        assert a[key] == pytest.approx(c[key], rel=2e-3), key


# ---- the command line: JSON, the page, sweeps, errors --------------------------------------


def test_cli_json_has_the_documented_shape() -> None:
    out = cli("--config", str(BUNDLED_PATH), "--scenario", str(MET_OUTAGE), "--seed", "1",
              "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["strategies"]) == {"overflow-router", "manual", "none"}
    assert data == json.loads(json.dumps(bundled_report(MET_OUTAGE.name).to_json()))
    for result in data["strategies"].values():
        assert set(result) >= {"region", "forces"}
        assert set(result["forces"]) == set(BUNDLED.forces)
        for block in [result["region"], *result["forces"].values()]:
            for svc in SERVICES:
                s = block[svc]
                assert {"offered", "answered", "abandoned", "shed", "within_10s_share",
                        "answer_s"} <= set(s)
                assert 0 <= s["within_10s_share"] <= 1
                a = s["answer_s"]
                assert a["p50"] <= a["p90"] <= a["p99"]


def test_cli_table_says_whether_the_region_meets_the_target() -> None:
    out = cli("--config", str(BUNDLED_PATH), "--scenario", str(MET_OUTAGE), "--seed", "1",
              "--strategy", "none")
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    assert re.fullmatch(r"999 answered within 10 s across the region: none \d+\.\d% "
                        r"\(misses 90%\)", last), last


def test_cli_html_is_one_self_contained_page(tmp_path: Path) -> None:
    page = tmp_path / "night.html"
    path = write(tmp_path, short_scenario())
    out = cli("--config", str(BUNDLED_PATH), "--scenario", str(path), "--html", str(page))
    assert out.returncode == 0, out.stderr
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert text.count("<svg") == 9  # three charts for each of three strategies
    assert not re.search(r"https?://|<script|<link|<img|@import|url\(", text), \
        "the page must open without a network"
    for name in STRATEGIES:
        assert name in text


def test_sweep_over_seeds_gives_confidence_intervals(tmp_path: Path) -> None:
    path = write(tmp_path, short_scenario())
    out = cli("--config", str(BUNDLED_PATH), "--scenario", str(path), "--json",
              "--strategy", "overflow-router", "--strategy", "manual",
              "--sweep", "manual.delay_s=60,600", "--seeds", "3")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)["sweep"]
    assert s["key"] == "manual.delay_s" and s["seeds"] == [0, 1, 2]
    assert [row["value"] for row in s["rows"]] == [60, 600]
    for row in s["rows"]:
        assert set(row["strategies"]) == {"overflow-router", "manual"}
        stat = row["strategies"]["manual"]["999_within_10s"]
        assert len(stat["runs"]) == 3 and stat["ci95"] is not None and stat["ci95"] >= 0
        assert min(stat["runs"]) - 1e-4 <= stat["mean"] <= max(stat["runs"]) + 1e-4
    quick, slow = (row["strategies"]["manual"]["999_within_10s"]["mean"] for row in s["rows"])
    assert quick > slow  # diverting by hand sooner answers more callers
    # the router does not read the manual delay: the same callers, the same result
    router = [row["strategies"]["overflow-router"]["999_within_10s"] for row in s["rows"]]
    assert router[0] == router[1]


def test_sweep_of_a_config_key_is_validated_again() -> None:
    sc = Scenario.model_validate(short_scenario(duration_s=900, timeline=[]))
    data = sweep(BUNDLED, sc, parse_sweep("forces.kent.mutual_aid.max_concurrent=10,30"), [4],
                 ["overflow-router"])
    assert len(data["sweep"]["rows"]) == 2
    with pytest.raises(ValueError, match="reserve_999: 8 is more than max_concurrent"):
        # a cap below the 999 reserve (8) is refused, as the router would refuse it
        sweep(BUNDLED, sc, parse_sweep("forces.kent.mutual_aid.max_concurrent=2"), [1],
              ["none"])
    with pytest.raises(ValueError, match="no such key"):
        sweep(BUNDLED, sc, parse_sweep("forces.kent.nothing=1"), [1], ["none"])


BAD = [  # (what to change, key named, words in the message)
    ({"arrivals": {"atlantis": {"999": 10}}}, "arrivals.atlantis", "unknown force 'atlantis'"),
    ({"duration_s": "long"}, "duration_s", "number"),
    ({"start": "25:00"}, "start", ""),
    ({"timeline": [{"force": "met", "from_s": 100, "to_s": 50, "telephony_up": False}]},
     "timeline[0]", "not after from_s"),
    ({"timeline": [{"force": "met", "from_s": 100}]}, "timeline[0]", "changes nothing"),
    ({"patience": {"999": {"mean_s": -1}}}, "patience.999.mean_s", ""),
    ({"surprise": 1}, "surprise", ""),
]


@pytest.mark.parametrize(("change", "key", "words"), BAD, ids=[b[1] for b in BAD])
def test_bad_scenarios_are_refused_with_file_line_and_key(tmp_path: Path, change: dict[str, Any],
                                                          key: str, words: str) -> None:
    path = write(tmp_path, short_scenario(**change))
    lines = path.read_text().splitlines()
    with pytest.raises(ConfigError) as info:
        load_scenario(path, BUNDLED)
    issue = next(i for i in info.value.issues if i.key.startswith(key))
    assert issue.file == str(path) and issue.line is not None and 1 <= issue.line <= len(lines)
    top = key.split(".")[0].split("[")[0]
    assert any(line.startswith(f"{top}:") for line in lines[:issue.line]), (issue, key)
    assert words in issue.message


def test_cli_refuses_a_bad_scenario_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, short_scenario(arrivals={"atlantis": {"999": 10}}))
    out = cli("--config", str(BUNDLED_PATH), "--scenario", str(path))
    assert out.returncode == 2 and out.stdout == ""
    assert re.match(rf"{re.escape(str(path))}:\d+: arrivals\.atlantis: unknown force",
                    out.stderr), out.stderr
    missing = cli("--config", str(BUNDLED_PATH), "--scenario", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml" in missing.stderr


def test_a_scenario_naming_no_known_force_is_refused_against_its_config() -> None:
    other: RouterConfig = config(force("alpha"))
    with pytest.raises(ConfigError, match="unknown force 'met'"):
        load_scenario(MET_OUTAGE, other)
