"""POST/GET /v1/handoffs over real HTTP on loopback: auth, validation, idempotency, status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import served
from handoff_support import handoff_app, incident, make_config

from adapters import sim
from router.config import Token
from router.handoff.desk import open_desk
from router.http.auth import TokenBook

TOKENS_ENV = {"T_KENT": "kent-secret", "T_MET": "met-secret", "T_VIEW": "view-secret",
              "T_PHONE": "phone-secret"}


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    cad_up: dict[str, bool]

    async def call(self, method: str, path: str, token: str | None = None,
                   **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, headers=headers,
                                        **kw) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Api]:
    sim.reset()
    config = make_config(tmp_path)
    book = TokenBook((Token(env="T_KENT", role="partner:kent"),
                      Token(env="T_MET", role="partner:met"), Token(env="T_VIEW", role="viewer"),
                      Token(env="T_PHONE", role="telephony")), TOKENS_ENV)
    cad_up = {"met": False}
    async with open_desk(config, alert=lambda a: None,
                         cad_up=lambda f: cad_up.get(f, True)) as desk, \
            served(handoff_app(desk, book)) as port, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield Api(f"http://127.0.0.1:{port}", s, cad_up)


async def test_new_then_duplicate(client: Api) -> None:
    status, first = await client.call("POST", "/v1/handoffs", "kent-secret", json=incident(1))
    assert status == 202 and first["status"] == "held" and first["from"] == "kent"
    status, again = await client.call("POST", "/v1/handoffs", "kent-secret", json=incident(1))
    assert status == 200 and again["id"] == first["id"]
    status, one = await client.call("GET", f"/v1/handoffs/{first['id']}", "view-secret")
    assert status == 200
    assert [h["status"] for h in one["history"]] == ["accepted", "held"]
    assert one["incident"]["incident_id"] == "KENT-000001"


async def test_partner_may_only_submit_its_own_incidents(client: Api) -> None:
    status, body = await client.call("POST", "/v1/handoffs", "met-secret",
                                     json=incident(1, frm="kent", to="met"))
    assert status == 403 and body["error"] == "forbidden" and body["field"] == "from"


@pytest.mark.parametrize(("token", "expected"), [(None, 401), ("nope", 401),
                                                 ("view-secret", 403), ("phone-secret", 403)])
async def test_only_partners_submit(client: Api, token: str | None, expected: int) -> None:
    status, body = await client.call("POST", "/v1/handoffs", token, json=incident(1))
    assert status == expected and set(body) >= {"error", "message"}


@pytest.mark.parametrize(("change", "field"), [
    ({"priority": "P9"}, "priority"),
    ({"opened_at": "2025-03-25T21:36:00"}, "opened_at"),  # no timezone: ambiguous
    ({"location": {"lat": 51.2}}, "location"),
    ({"to": "kent"}, None),
    ({"colour": "red"}, "colour"),
    ({"incident_id": ""}, "incident_id"),
])
async def test_invalid_incidents_name_their_field(client: Api, change: dict[str, Any],
                                                  field: str | None) -> None:
    status, body = await client.call("POST", "/v1/handoffs", "kent-secret",
                                     json=incident(1) | change)
    assert status == 400 and body["error"] == "invalid"
    if field:
        assert body["field"] == field


async def test_missing_field_and_unknown_destination(client: Api) -> None:
    body = incident(1)
    del body["summary"]
    status, err = await client.call("POST", "/v1/handoffs", "kent-secret", json=body)
    assert (status, err["field"]) == (400, "summary")
    status, err = await client.call("POST", "/v1/handoffs", "kent-secret",
                                    json=incident(2, to="wessex"))
    assert (status, err["error"], err["field"]) == (400, "unknown_force", "to")


async def test_list_filters_and_unknown_id(client: Api) -> None:
    for n in range(3):
        await client.call("POST", "/v1/handoffs", "kent-secret", json=incident(n))
    await client.call("POST", "/v1/handoffs", "kent-secret", json=incident(9, to="essex"))
    for _ in range(200):  # essex's simulated CAD is up: its handoff is delivered
        _, done = await client.call("GET", "/v1/handoffs?status=delivered", "view-secret")
        if done["count"]:
            break
        await asyncio.sleep(0.01)
    assert [h["to"] for h in done["handoffs"]] == ["essex"]
    status, held = await client.call("GET", "/v1/handoffs?status=held&to=met", "view-secret")
    assert status == 200 and held["count"] == 3
    status, err = await client.call("GET", "/v1/handoffs?status=lost", "view-secret")
    assert status == 400 and err["field"] == "status"
    status, err = await client.call("GET", "/v1/handoffs/0000", "view-secret")
    assert status == 404
    # a partner reads what it sent (and what was sent to it), nothing else
    status, mine = await client.call("GET", "/v1/handoffs", "kent-secret")
    assert status == 200 and mine["count"] == 4
    assert {h["from"] for h in mine["handoffs"]} == {"kent"}
    status, theirs = await client.call("GET", "/v1/handoffs", "met-secret")
    assert status == 200 and {h["to"] for h in theirs["handoffs"]} == {"met"}
    status, _ = await client.call("GET", f"/v1/handoffs/{done['handoffs'][0]['id']}",
                                  "met-secret")  # kent to essex: none of met's business
    assert status == 404
