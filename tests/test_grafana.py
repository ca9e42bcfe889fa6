"""The Grafana board asks only for what a running router exposes: every metric each query names
is in a real scrape of /metrics, and every label it filters, groups or joins by is one that
metric carries there (or that Prometheus adds: job, instance)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import make_config, running_service

from router.infra import metrics

BOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "overflow-router.json"
NAME = re.compile(r"\b(overflow_[a-z_]+|up)\b(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
ADDED_BY_PROMETHEUS = {"job", "instance"}
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}


def queries() -> list[tuple[str, str]]:
    board = json.loads(BOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel.get("targets", [])]


def exposed(text: str) -> dict[str, set[str]]:
    """Sample names in a scrape with the labels they carry. A family present with no samples
    yet (a counter nothing has counted) has the labels it was declared with."""
    declared = {c._name: set(c._labelnames) for c in vars(metrics).values()
                if hasattr(c, "_labelnames")} | {g.name: set(g.labelnames)
                                                 for g in metrics.BOARD_GAUGES}
    out: dict[str, set[str]] = {"up": {"job", "instance"}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
        if not family.samples:
            for suffix in SUFFIXES.get(family.type, [""]):
                out[family.name + suffix] = declared[family.name] | (
                    {"le"} if suffix == "_bucket" else set())
    return out


def check(expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    names = NAME.findall(expr)
    if not names:
        return [f"{expr}: names no metric"]
    labels: set[str] = set(ADDED_BY_PROMETHEUS)
    for name, selector in names:
        if name not in known:
            problems.append(f"{name} is not exposed")
            continue
        labels |= known[name]
        for label in MATCHER.findall(selector):
            if label not in known[name] | ADDED_BY_PROMETHEUS:
                problems.append(f"{name} has no label {label}")
    for group in GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in labels:
                problems.append(f"no metric in the query has a label {label}")
    return problems


@pytest.fixture
async def scrape(tmp_path: Path) -> str:
    """A real router's exposition, with a centre declared down and calls routed."""
    async with running_service(make_config(tmp_path)) as r:
        status, _ = await r.call("PUT", "/v1/forces/met/override", "manager",
                                 json={"state": "down", "reason": "board test"})
        assert status == 200
        for i in range(3):
            status, _ = await r.call("POST", "/v1/route", "telephony",
                                     json={"call_id": f"g{i}", "service": "999",
                                           "origin": "met"})
            assert status == 200
        status, text = await r.call("GET", "/metrics")
        assert status == 200
        return str(text)


async def test_every_board_query_names_what_the_router_exposes(scrape: str) -> None:
    known = exposed(scrape)
    found = queries()
    assert len(found) >= 20
    problems = [f"{title}: {p}" for title, expr in found for p in check(expr, known)]
    assert not problems, "\n".join(problems)
    # the board is really rebuilt from the router's own facts, not from empty families
    for name in ("overflow_centre_diverting", "overflow_centre_capacity",
                 "overflow_aid_headroom", "overflow_override_active",
                 "overflow_routing_share", "overflow_route_request_seconds_bucket"):
        assert any(s.startswith(name + "{") or s.startswith(name + " ")
                   for s in scrape.splitlines()), name
    assert "_created" not in scrape


def test_the_query_check_can_fail() -> None:
    known = {"overflow_centre_state": {"force", "state"}}
    assert check("max by (force) (overflow_centre_state)", known) == []
    assert check("overflow_centre_states", known)
    assert check('overflow_centre_state{forc="met"}', known)
    assert check("max by (region) (overflow_centre_state)", known)
    assert check("vector(1)", known)
