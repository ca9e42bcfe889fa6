"""The command line as a user runs it: `python -m router ...` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from router.config import load_config
from router.engine.model import Service

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "config" / "forces.yaml"
BROKEN = ROOT / "tests" / "configs" / "broken"
CONTRACT_FIELDS = {"call_id", "service", "origin", "destination", "sip_uri", "reason", "rule",
                   "decision_id", "decided_at"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, check=False)


def test_validate_bundled_config_prints_a_summary() -> None:
    out = run("validate", str(BUNDLED))
    assert out.returncode == 0, out.stderr
    cfg = load_config(BUNDLED)
    assert f"valid — {len(cfg.forces)} forces" in out.stdout.splitlines()[0]
    rows = {line.split()[0] for line in out.stdout.splitlines()[2:]}
    assert set(cfg.forces) <= rows
    assert len(out.stdout.splitlines()) < 40  # one screen


def test_validate_broken_config_exits_2_with_every_error() -> None:
    path = BROKEN / "several-errors.yaml"
    out = run("validate", str(path.relative_to(ROOT)))
    assert out.returncode == 2
    expected = [line.removeprefix("# expect: ").replace(path.name, str(path.relative_to(ROOT)))
                for line in path.read_text().splitlines() if line.startswith("# expect: ")]
    assert len(expected) > 1
    assert out.stderr.splitlines() == expected
    assert out.stdout == ""


def test_route_what_if_met_down_kent_busy() -> None:
    """"If the Met is down and Kent has 20 calls in flight, where do the next 100 calls go?"."""
    out = run("route", str(BUNDLED), "--service", "999", "--origin", "met", "--state", "met=down",
              "--load", "kent=20", "--count", "100")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 100
    assert all(set(r) >= CONTRACT_FIELDS for r in records)
    assert len({r["call_id"] for r in records}) == 100
    cfg = load_config(BUNDLED)
    met = cfg.forces["met"]
    partners = {r.to: r for r in met.overflow[Service.EMERGENCY]}
    for r in records:
        assert (r["service"], r["origin"]) == ("999", "met")
        assert r["reason"] in ("origin_down", "last_resort")
        assert r["sip_uri"] == cfg.forces[r["destination"]].sip[Service.EMERGENCY]
        if r["reason"] == "origin_down":
            assert r["destination"] in partners
    aid = Counter(r["destination"] for r in records if r["reason"] == "origin_down")
    for fid, n in aid.items():  # the simultaneous calls respect every mutual-aid cap
        assert n <= cfg.forces[fid].mutual_aid.max_concurrent
        cap = partners[fid].max_concurrent
        assert cap is None or n <= cap
    total_caps = sum(cfg.forces[p].mutual_aid.max_concurrent for p in partners)
    if total_caps < 100:  # more calls than partners may take: the rest still get a destination
        assert sum(r["reason"] == "last_resort" for r in records) >= 100 - total_caps


def test_route_101_sheds_with_an_action_when_nobody_can_help() -> None:
    states = [f"--state={fid}=down" for fid in load_config(BUNDLED).forces]
    out = run("route", str(BUNDLED), "--service", "101", "--origin", "kent", *states)
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert (record["reason"], record["action"], record["destination"]) == (
        "shed", "announcement", "kent")


def test_route_refuses_unknown_forces_and_bad_states() -> None:
    out = run("route", str(BUNDLED), "--service", "999", "--origin", "gotham")
    assert out.returncode == 2
    assert "unknown force: gotham" in out.stderr
    out = run("route", str(BUNDLED), "--service", "999", "--origin", "met",
              "--state", "met=on_fire")
    assert out.returncode != 0
    assert "on_fire" in out.stderr
