"""The HTTP API over a real loopback socket: every route, every auth failure, malformed input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from service_support import Running, in_test_client, make_config, running_service

from router.engine.model import Reason, Service

ROUTE = {"call_id": "c-1", "service": "999", "origin": "met"}


@pytest.fixture(params=["socket", "test_client"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """Every test runs against the whole service on a loopback socket, and against the same
    app under aiohttp's test client."""
    start = running_service if request.param == "socket" else in_test_client
    async with start(make_config(tmp_path)) as running:
        yield running


async def declare_all_normal(api: Running) -> None:
    for force in api.service.config.forces:
        status, _ = await api.call("PUT", f"/v1/forces/{force}/override", "manager",
                                   json={"state": "normal", "reason": "test"})
        assert status == 200


# ---- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "role", "status"), [
    ("POST", "/v1/route", None, 401),
    ("GET", "/v1/forces", None, 401),
    ("POST", "/v1/route", "viewer", 403),
    ("POST", "/v1/route", "manager", 403),
    ("POST", "/v1/route", "partner:kent", 403),
    ("GET", "/v1/forces", "telephony", 403),
    ("GET", "/v1/routing-table", "partner:kent", 403),
    ("PUT", "/v1/forces/met/override", "viewer", 403),
    ("DELETE", "/v1/forces/met/override", "telephony", 403),
    ("POST", "/v1/admin/reload", "viewer", 403),
    ("POST", "/v1/calls/x/end", "viewer", 403),
    ("POST", "/v1/handoffs", "telephony", 403),
])
async def test_roles_are_enforced(api: Running, method: str, path: str, role: str | None,
                                  status: int) -> None:
    got, body = await api.call(method, path, role, json={})
    assert got == status
    assert body["error"] == ("unauthorized" if status == 401 else "forbidden")
    assert body["message"]


@pytest.mark.parametrize("header",
                         ["Bearer nope", "Basic dXNlcjpwYXNz", "Bearer ", "t-viewer-secret"])
async def test_bad_credentials_are_refused(api: Running, header: str) -> None:
    status, body = await api.call("GET", "/v1/forces", headers={"Authorization": header})
    assert status == 401
    assert body["error"] == "unauthorized"


async def test_a_manager_may_view(api: Running) -> None:
    status, body = await api.call("GET", "/v1/forces", "manager")
    assert status == 200
    assert set(body["forces"]) == set(api.service.config.forces)


# ---- routing --------------------------------------------------------------------------------


async def test_route_post_get_and_text(api: Running) -> None:
    await declare_all_normal(api)
    status, decision = await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    assert status == 200
    assert decision["destination"] == "met" and decision["reason"] == "home"
    assert {"call_id", "service", "origin", "destination", "sip_uri", "reason", "rule",
            "decision_id", "decided_at"} <= set(decision)
    status, again = await api.call("GET", "/v1/route", "telephony", params=ROUTE)
    assert status == 200 and again == decision  # a retry is the same decision
    status, text = await api.call("GET", "/v1/route", "telephony",
                                  params={**ROUTE, "call_id": "c-2", "format": "text"})
    assert status == 200 and text == decision["sip_uri"]


async def test_down_home_sends_999_to_partners_and_sheds_101(api: Running) -> None:
    await declare_all_normal(api)
    for partner in ("kent", "surrey", "essex", "tvp", "herts"):
        await api.call("PUT", f"/v1/forces/{partner}/override", "manager",
                       json={"state": "down", "reason": "test"})
    await api.call("PUT", "/v1/forces/met/override", "manager",
                   json={"state": "down", "reason": "CAD crash"})
    _, d999 = await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    assert d999["destination"] == "city" and d999["reason"] == "origin_down"
    _, d101 = await api.call("POST", "/v1/route", "telephony",
                             json={**ROUTE, "call_id": "c-101", "service": "101"})
    assert d101["reason"] == "shed" and d101["action"] == "announcement"


async def test_same_call_id_for_another_origin_conflicts(api: Running) -> None:
    await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    status, body = await api.call("POST", "/v1/route", "telephony",
                                  json={**ROUTE, "origin": "kent"})
    assert status == 409 and body["field"] == "call_id"


@pytest.mark.parametrize(("body", "field", "fragment"), [
    ({"service": "999", "origin": "met"}, "call_id", "required"),
    ({**ROUTE, "service": "112"}, "service", "999"),
    ({**ROUTE, "origin": "gotham"}, "origin", "unknown force 'gotham'"),
    ({**ROUTE, "colour": "blue"}, "colour", "unknown field"),
    ({**ROUTE, "call_id": ""}, "call_id", "at least 1"),
    ({**ROUTE, "call_id": 42}, "call_id", "string"),
])
async def test_invalid_route_requests_name_the_field(api: Running, body: dict[str, object],
                                                     field: str, fragment: str) -> None:
    status, err = await api.call("POST", "/v1/route", "telephony", json=body)
    assert status == 400
    assert err["field"] == field
    assert fragment in err["message"]


async def test_malformed_and_oversized_bodies(api: Running) -> None:
    status, err = await api.call("POST", "/v1/route", "telephony", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert (status, err["error"]) == (400, "malformed_json")
    status, err = await api.call("POST", "/v1/route", "telephony", json=[ROUTE])
    assert status == 400 and "JSON object" in err["message"]
    status, err = await api.call("POST", "/v1/route", "telephony",
                                 json={**ROUTE, "caller": "x" * 70_000})
    assert status == 413 and err["error"] == "too_large"
    status, err = await api.call("GET", "/v1/route", "telephony",
                                 params={**ROUTE, "format": "xml"})
    assert status == 400 and err["field"] == "format"


async def test_unknown_paths_and_methods_are_json_errors(api: Running) -> None:
    status, err = await api.call("GET", "/v2/nothing", "viewer")
    assert (status, err["error"]) == (404, "not_found")
    status, err = await api.call("DELETE", "/v1/route", "telephony")
    assert (status, err["error"]) == (405, "method_not_allowed")


async def test_ending_a_call_frees_capacity(api: Running) -> None:
    await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    _, forces = await api.call("GET", "/v1/forces", "viewer")
    assert forces["forces"]["met"]["calls_in_flight"] == 1
    assert forces["forces"]["met"]["calls_in_flight_by_service"] == {"999": 1, "101": 0}
    for _ in range(2):  # idempotent
        status, _ = await api.call("POST", "/v1/calls/c-1/end", "telephony")
        assert status == 204
    _, forces = await api.call("GET", "/v1/forces", "viewer")
    assert forces["forces"]["met"]["calls_in_flight"] == 0


# ---- declarations, routing table, reload ------------------------------------------------------


async def test_override_and_clear(api: Running) -> None:
    await declare_all_normal(api)
    status, body = await api.call("PUT", "/v1/forces/met/override", "manager",
                                  json={"state": "draining", "reason": "shift change",
                                        "expires_in_s": 600})
    assert status == 200 and body["state"] == "draining"
    _, decision = await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    assert decision["reason"] == "origin_draining"
    status, body = await api.call("DELETE", "/v1/forces/met/override", "manager")
    assert status == 200 and body["cleared"] is True
    status, body = await api.call("DELETE", "/v1/forces/met/override", "manager")
    assert status == 200 and body["cleared"] is False
    assert await asyncio.to_thread(api.service.audit.sync)  # the writer thread has written it
    audit = (api.config_path.parent / "audit.jsonl").read_text()
    assert "shift change" in audit


async def test_a_declaration_names_a_person(tmp_path: Path) -> None:
    """A token shared by a control room names nobody: each declaration must say who makes
    it, and that name (with the token it came through) is what the audit log and the board
    show, never only a variable's name."""
    path = make_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    for token in raw["service"]["tokens"]:
        token.pop("operator", None)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with running_service(path) as api:
        body = {"state": "down", "reason": "CAD fault"}
        status, err = await api.call("PUT", "/v1/forces/met/override", "manager", json=body)
        assert (status, err["field"]) == (400, "operator")
        status, state = await api.call("PUT", "/v1/forces/met/override", "manager",
                                       json={**body, "operator": "Ch Insp R. Patel"})
        assert status == 200 and state["override"]["source"] == "manager:Ch Insp R. Patel"
        status, err = await api.call("DELETE", "/v1/forces/met/override", "manager")
        assert (status, err["field"]) == (400, "operator")
        status, done = await api.call("DELETE", "/v1/forces/met/override?operator=Insp+Q.+Lee",
                                      "manager")
        assert status == 200 and done["cleared"] is True
        assert await asyncio.to_thread(api.service.audit.sync)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    people = [(r["kind"], r["source"], r["token"]) for r in audit
              if r["kind"] in ("declaration", "clear")]
    assert people == [("declaration", "manager:Ch Insp R. Patel", "TEST_TOKEN_2"),
                      ("clear", "manager:Insp Q. Lee", "TEST_TOKEN_2")]


@pytest.mark.parametrize(("force", "body", "status", "field"), [
    ("gotham", {"state": "down", "reason": "x"}, 404, "force"),
    ("met", {"state": "sleeping", "reason": "x"}, 400, "state"),
    ("met", {"state": "unknown", "reason": "x"}, 400, "state"),
    ("met", {"state": "down"}, 400, "reason"),
    ("met", {"state": "down", "reason": "x", "expires_in_s": -5}, 400, "expires_in_s"),
])
async def test_bad_overrides(api: Running, force: str, body: dict[str, object], status: int,
                             field: str) -> None:
    got, err = await api.call("PUT", f"/v1/forces/{force}/override", "manager", json=body)
    assert got == status and err["field"] == field


async def test_routing_table(api: Running) -> None:
    await declare_all_normal(api)
    await api.call("PUT", "/v1/forces/met/override", "manager",
                   json={"state": "down", "reason": "test"})
    status, body = await api.call("GET", "/v1/routing-table", "viewer")
    assert status == 200
    met = body["routing"]["met"]["999"]
    assert {s["destination"] for s in met} == {"kent", "surrey", "essex", "tvp", "herts", "city"}
    assert sum(s["share"] for s in met) == pytest.approx(1.0, abs=1e-3)


async def test_reload_refuses_an_invalid_config_and_keeps_serving(api: Running) -> None:
    good = api.config_path.read_text()
    api.config_path.write_text(good.replace("handlers_on_duty: 120", "handlers_on_duty: -1"))
    status, body = await api.call("POST", "/v1/admin/reload", "manager")
    assert status == 422 and body["error"] == "config_invalid"
    assert any("forces.met.centre.handlers_on_duty" in i and ":" in i for i in body["issues"])
    status, _ = await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    assert status == 200
    api.config_path.write_text(good.replace("handlers_on_duty: 120", "handlers_on_duty: 130"))
    status, body = await api.call("POST", "/v1/admin/reload", "manager")
    assert status == 200 and body["status"] == "reloaded"
    _, forces = await api.call("GET", "/v1/forces", "viewer")
    assert forces["forces"]["met"]["capacity"]["handlers_on_duty"] == 130


async def test_reload_swaps_without_failing_requests(api: Running) -> None:
    """Requests racing a reload all succeed: the swap is atomic."""
    statuses: list[int] = []

    async def hammer(n: int) -> None:
        for i in range(n):
            status, _ = await api.call("POST", "/v1/route", "telephony",
                                       json={**ROUTE, "call_id": f"race-{n}-{i}"})
            statuses.append(status)

    async def reload_many() -> None:
        for _ in range(10):
            status, _ = await api.call("POST", "/v1/admin/reload", "manager")
            assert status == 200

    await asyncio.gather(hammer(100), hammer(101), reload_many())
    assert statuses and set(statuses) == {200}


# ---- operational endpoints ------------------------------------------------------------------


async def test_health_readiness_metrics_openapi_dashboard(api: Running) -> None:
    status, body = await api.call("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    # ready on its own dependencies (config, handoff store), whatever the centres' evidence
    status, body = await api.call("GET", "/readyz")
    assert (status, body["status"]) == (200, "ready") and "met" in body["no_evidence_yet"]
    assert body["checks"] == {"config": "ok", "handoff_store": "ok"}
    await declare_all_normal(api)
    status, body = await api.call("GET", "/readyz")
    assert (status, body["status"], body["no_evidence_yet"]) == (200, "ready", [])
    await api.call("POST", "/v1/route", "telephony", json=ROUTE)
    status, text = await api.call("GET", "/metrics")
    assert status == 200
    routed = ('overflow_calls_routed_total'
              '{destination="met",origin="met",reason="home",service="999"}')
    assert routed in text
    assert "overflow_decision_seconds_bucket" in text
    assert 'overflow_centre_state{force="met",state="normal"} 1.0' in text
    assert 'overflow_centre_state{force="met",state="unknown"} 0.0' in text
    assert 'overflow_state_changes_total{force="met",source="manager",to="normal"}' in text
    status, spec = await api.call("GET", "/openapi.json")
    assert status == 200 and "/v1/route" in spec["paths"] and "/v1/handoffs" in spec["paths"]
    listing = spec["paths"]["/v1/handoffs"]["get"]  # schemathesis found these undocumented
    assert "400" in listing["responses"]
    assert {p["name"] for p in listing["parameters"]} == {"status", "to", "limit"}
    schemas = spec["components"]["schemas"]
    decision = schemas["Decision"]  # derived from DecisionRecord, so it lists every enum value
    assert schemas[decision["properties"]["reason"]["$ref"].rpartition("/")[2]]["enum"] == \
        [r.value for r in Reason]
    assert schemas[decision["properties"]["service"]["$ref"].rpartition("/")[2]]["enum"] == \
        [s.value for s in Service]
    assert "action" in decision["properties"] and "action" not in decision["required"]
    status, html = await api.call("GET", "/")
    assert status == 200 and "overflow-router" in html


async def test_shutdown_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    done = 0
    twenty_done = asyncio.Event()

    async def route(session: aiohttp.ClientSession, base: str, i: int) -> int:
        nonlocal done
        try:
            async with session.post(f"{base}/v1/route", json={**ROUTE, "call_id": f"s-{i}"},
                                    headers={"Authorization": "Bearer t-telephony-secret"}) as r:
                await r.read()
                return r.status
        finally:
            done += 1
            if done >= 20:
                twenty_done.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as own:
        async with running_service(make_config(tmp_path)) as api:
            pending = [asyncio.create_task(route(own, api.base, i)) for i in range(200)]
            await twenty_done.wait()
        results = await asyncio.gather(*pending, return_exceptions=True)
    # each request either completed or was refused before it started; none failed half-way
    completed = [r for r in results if isinstance(r, int)]
    assert len(completed) >= 20
    assert set(completed) == {200}
    assert all(isinstance(r, (int, aiohttp.ClientConnectionError)) for r in results), results
