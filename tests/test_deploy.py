"""The operating files in deploy/ agree with the router: every alert reads a metric the router
exports, with labels and label values it really uses, and the alerts pass promtool's own tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import need

from router.engine.model import CentreState, Reason, Service
from router.handoff.incident import Status
from router.infra import metrics

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
SELECTOR = re.compile(r"\b(overflow_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# the values a label can take, where the router fixes them
VALUES = {"state": {s.value for s in CentreState}, "reason": {r.value for r in Reason},
          "component": {"telephony", "cad"},
          "service": {s.value for s in Service}, "status": {s.value for s in Status},
          "outcome": {"applied", "refused"}, "priority": {"P1", "P2", "P3", "P4"}}


def exported() -> dict[str, set[str]]:
    """Every sample name the router's metrics can produce, with its label names."""
    names: dict[str, set[str]] = {g.name: set(g.labelnames) for g in metrics.BOARD_GAUGES}
    for collector in vars(metrics).values():
        if not hasattr(collector, "_labelnames"):
            continue
        for family in collector.describe():
            labels = set(collector._labelnames)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""])
            for suffix in suffixes:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_every_alert_reads_what_the_router_exports() -> None:
    known = exported()
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    assert len(rules) >= 10
    used = set()
    for rule in rules:
        for name, selector in SELECTOR.findall(rule["expr"]):
            assert name in known, f"{rule['alert']}: {name} is not exported"
            used.add(name)
            for label, op, value in MATCHER.findall(selector or ""):
                assert label in known[name], f"{rule['alert']}: {name} has no label {label}"
                if label in VALUES and op == "=":
                    assert value in VALUES[label], f"{rule['alert']}: {label}={value!r}"
        kept = {label.strip() for by in re.findall(r"\bby \(([^)]*)\)", rule["expr"])
                for label in by.split(",")}
        if not kept:  # no aggregation: the series keep all their labels
            kept = {"instance", "job"}.union(
                *(known.get(name, set()) for name, _ in SELECTOR.findall(rule["expr"])))
        for text in rule.get("annotations", {}).values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in kept, f"{rule['alert']}: annotation uses {label}, not kept"
    # the failures an on-call engineer must hear of are covered
    for name in ("overflow_centre_state", "overflow_evidence_fail_static",
                 "overflow_calls_routed_total", "overflow_handoff_outcomes_total",
                 "overflow_handoff_backlog", "overflow_config_reloads_total"):
        assert name in used, name


def test_alerts_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool", "Debian's prometheus package")
    assert promtool is not None
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("broken", ["overflow_centre_states", 'reason="lastresort"',
                                    "{{ $labels.force }} found"])
def test_the_metric_check_can_fail(tmp_path: Path, broken: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The first test is only worth having if a typo in the rules makes it fail."""
    rules = (PROMETHEUS / "alerts.yml").read_text()
    if broken.startswith("overflow_"):
        rules = rules.replace("overflow_centre_state", broken, 1)
    elif broken.startswith("reason"):
        rules = rules.replace('reason="last_resort"', broken, 1)
    else:  # an annotation naming a label the aggregation drops
        rules = rules.replace("{{ $labels.origin }} found", broken, 1)
    (tmp_path / "alerts.yml").write_text(rules)
    monkeypatch.setattr(sys.modules[__name__], "PROMETHEUS", tmp_path)
    with pytest.raises(AssertionError):
        test_every_alert_reads_what_the_router_exports()


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    need(analyze is not None, "systemd-analyze", "Debian's systemd package")
    assert analyze is not None
    unit = (PROMETHEUS.parent / "systemd" / "overflow-router.service").read_text()
    reloads = [line for line in unit.splitlines() if line.startswith("ExecReload=")]
    assert reloads == [  # validate first: a bad file fails the reload before any signal
        "ExecReload=/opt/overflow-router/venv/bin/overflow-router validate "
        "/etc/overflow-router/forces.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID"]
    assert "Restart=always" in unit
    # as installed, but pointing at this checkout's own entry point
    here = Path(sys.executable).parent / "overflow-router"
    local = tmp_path / "overflow-router.service"
    local.write_text(unit.replace("/opt/overflow-router/venv/bin/overflow-router", str(here)))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
            for r in g["rules"]]


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    """promtool passes a rule with no test at all: so each alert must appear in the tests, and
    its runbook_url must lead to a heading of docs/OPERATIONS.md."""
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]
              if case.get("exp_alerts")}
    operations = (PROMETHEUS.parent.parent / "docs" / "OPERATIONS.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    for rule in alert_rules():
        name = rule["alert"]
        assert name in tested, f"{name} has no promtool test that makes it fire"
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith("{{ $externalLabels.runbook_base }}/OPERATIONS.md#"), name
        assert url.rpartition("#")[2] in anchors, f"{name}: no heading {url} in OPERATIONS.md"
