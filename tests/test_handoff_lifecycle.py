"""A handoff reaches a person: a dispatcher at the destination accepts or rejects it, later it
is completed, and the sender hears of every step. Over real HTTP on loopback, on the real
store; the last test runs the whole service with a private Mosquitto and a sender's
notify_url."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import yaml
from aiohttp import web
from conftest import Broker, free_port, served
from handoff_support import Cads, handoff_app, incident, make_config, wait_for
from service_support import environ, running_service
from service_support import make_config as service_config

from adapters import sim
from router.config import RouterConfig, Token
from router.handoff.desk import open_desk
from router.http.auth import TokenBook

FORCES = ("met", "city", "kent", "surrey", "sussex", "essex", "herts", "tvp")
ENV = {f"T_{force.upper()}": force for force in FORCES} | {"T_VIEW": "view"}
BOOK = (*(Token(env=f"T_{force.upper()}", role=f"partner:{force}") for force in FORCES),
        Token(env="T_VIEW", role="viewer"))
ACCEPT = {"outcome": "accepted", "by": "PC 1234 Smith", "reference": "MET-CAD-77"}
REJECT = {"outcome": "rejected", "by": "PS 42 Jones", "cause": "location outside our area"}


@dataclass
class Desk:
    base: str
    session: aiohttp.ClientSession
    cads: Cads
    alerts: list[dict[str, Any]] = field(default_factory=list)
    told: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[
            int, Any]:
        async with self.session.request(method, self.base + path, json=body, headers={
                "Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()

    async def hand_over(self, n: int, **kw: Any) -> str:
        status, body = await self.call("POST", "/v1/handoffs", "kent", incident(n, **kw))
        assert status == 202, body
        return str(body["id"])

    async def status(self, hid: str) -> str:
        return str((await self.call("GET", f"/v1/handoffs/{hid}", "view"))[1]["status"])

    async def delivered(self, hid: str) -> None:
        async def done() -> bool:
            return await self.status(hid) == "delivered"
        await wait_for(done)

    def statuses_told(self, hid: str) -> list[str]:
        return [m["status"] for m in self.told if m["handoff_id"] == hid]


@contextlib.asynccontextmanager
async def desk_at(config: RouterConfig) -> AsyncIterator[Desk]:
    sim.reset()
    cads = Cads()
    book = TokenBook(BOOK, ENV)
    holder = Desk("", None, cads)  # type: ignore[arg-type]
    async with open_desk(config, alert=holder.alerts.append, cad_up=cads,
                         notify=holder.told.append) as desk, \
            served(handoff_app(desk, book)) as port, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        holder.base, holder.session = f"http://127.0.0.1:{port}", session
        yield holder


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Desk]:
    async with desk_at(make_config(tmp_path)) as desk:
        yield desk


async def test_accepted_then_completed_and_the_sender_hears_each_step(api: Desk) -> None:
    hid = await api.hand_over(1)
    await api.delivered(hid)
    path = f"/v1/handoffs/{hid}"
    status, body = await api.call("POST", f"{path}/acknowledgement", "met", ACCEPT)
    assert status == 200 and body["status"] == "acknowledged", body
    assert body["acknowledgement"]["by"] == "PC 1234 Smith"
    assert body["acknowledgement"]["reference"] == "MET-CAD-77"
    # the same answer again is a repeat, recorded once; another answer is a conflict
    assert (await api.call("POST", f"{path}/acknowledgement", "met", ACCEPT))[0] == 200
    status, err = await api.call("POST", f"{path}/acknowledgement", "met", REJECT)
    assert (status, err["error"]) == (409, "conflict")
    status, body = await api.call("POST", f"{path}/completion", "met",
                                  {"outcome": "completed", "note": "suspect arrested"})
    assert status == 200 and body["status"] == "completed"
    assert body["completion"]["note"] == "suspect arrested"
    assert [h["status"] for h in body["history"]] == [
        "accepted", "delivering", "delivered", "acknowledged", "completed"]
    # the sender reads it with its own token, and was told of every step
    status, mine = await api.call("GET", path, "kent")
    assert status == 200 and mine["status"] == "completed"
    assert api.statuses_told(hid) == ["delivered", "acknowledged", "completed"]
    told = next(m for m in api.told if m["status"] == "acknowledged")
    assert (told["from"], told["to"], told["by"]) == ("kent", "met", "PC 1234 Smith")
    # completed is final: nothing more is taken
    status, err = await api.call("POST", f"{path}/completion", "met", {"outcome": "aborted"})
    assert status == 409


async def test_only_the_destination_answers_and_only_once_delivered(api: Desk) -> None:
    api.cads.up["met"] = False
    sim.sim_cad("met").up = False
    held = await api.hand_over(2)
    status, err = await api.call("POST", f"/v1/handoffs/{held}/acknowledgement", "met", ACCEPT)
    assert (status, err["error"]) == (409, "not_delivered")
    for token in ("essex", "kent"):  # not the destination: not theirs to answer
        status, err = await api.call("POST", f"/v1/handoffs/{held}/acknowledgement", token,
                                     ACCEPT)
        assert (status, err["error"]) == (403, "forbidden")
    status, _ = await api.call("POST", f"/v1/handoffs/{held}/acknowledgement", "view", ACCEPT)
    assert status == 403  # a viewer is no partner
    status, _ = await api.call("POST", "/v1/handoffs/" + "0" * 32 + "/acknowledgement", "met",
                               ACCEPT)
    assert status == 404


@pytest.mark.parametrize(("body", "field_"), [
    ({"outcome": "rejected", "by": "PS 42"}, "cause"),
    ({"outcome": "maybe", "by": "PS 42"}, "outcome"),
    ({"outcome": "accepted"}, "by"),
    ({"outcome": "accepted", "by": "x\ny"}, "by"),
    ({"outcome": "accepted", "by": "x", "at": "yesterday"}, "at"),
])
async def test_a_bad_answer_is_a_400_naming_its_field(api: Desk, body: dict[str, Any],
                                                      field_: str) -> None:
    hid = await api.hand_over(3)
    await api.delivered(hid)
    status, err = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met", body)
    assert status == 400 and err["field"] == field_, err


async def test_a_rejection_goes_back_to_the_sender_at_once(api: Desk) -> None:
    hid = await api.hand_over(4)
    await api.delivered(hid)
    status, body = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met", REJECT)
    assert status == 200 and body["status"] == "rejected"
    assert body["acknowledgement"]["cause"] == "location outside our area"
    alert = next(a for a in api.alerts if a["kind"] == "handoff_rejected")
    assert (alert["handoff_id"], alert["from"], alert["cause"], alert["next"]) == (
        hid, "kent", "location outside our area", None)
    assert api.statuses_told(hid)[-1] == "rejected"


async def test_a_rejection_is_offered_to_the_next_partner(tmp_path: Path) -> None:
    config = make_config(tmp_path, on_reject="next_partner")
    first = config.forces["met"].overflow["999"][0].to  # met's first 999 partner, not kent
    async with desk_at(config) as api:
        hid = await api.hand_over(5)
        await api.delivered(hid)
        status, body = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met",
                                      REJECT)
        assert status == 200 and body["status"] == "offered" and body["to"] != "met"
        nxt = body["to"]
        assert nxt == (first if first != "kent" else config.forces["met"].overflow["999"][1].to)
        await api.delivered(hid)
        assert hid in sim.sim_cad(nxt).received
        # met had its say; the handoff is now the next partner's to answer
        status, _ = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met",
                                   ACCEPT)
        assert status == 403
        status, body = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", nxt,
                                      ACCEPT)
        assert status == 200 and body["status"] == "acknowledged"
        assert body["acknowledgement"]["by"] == ACCEPT["by"]  # the new destination's answer
        assert api.statuses_told(hid)[:3] == ["delivered", "offered", "delivered"]


async def test_a_delivered_p1_nobody_answers_escalates_and_a_late_answer_still_counts(
        tmp_path: Path) -> None:
    config = make_config(tmp_path, ack_deadlines_s={"P1": 0.3})
    async with desk_at(config) as api:
        hid = await api.hand_over(6)

        async def escalated() -> bool:
            return await api.status(hid) == "escalated"
        await wait_for(escalated)
        await wait_for(lambda: api.alerts)  # raised once the sheet is written
        alert = next(a for a in api.alerts if a["kind"] == "handoff_escalated")
        assert (alert["waiting_for"], alert["deadline_s"]) == ("acknowledgement", 0.3)
        assert alert["sheet"] and await asyncio.to_thread(Path(alert["sheet"]).exists)
        status, body = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met",
                                      ACCEPT)
        assert status == 200 and body["status"] == "acknowledged"


async def test_a_restart_keeps_watching_for_the_dispatcher(tmp_path: Path) -> None:
    config = make_config(tmp_path, ack_deadlines_s={"P1": 0.5})
    async with desk_at(config) as api:
        hid = await api.hand_over(7)
        await api.delivered(hid)
    async with desk_at(config) as api:  # the same store: resumed, and the deadline holds

        async def escalated() -> bool:
            return await api.status(hid) == "escalated"
        await wait_for(escalated)


# ---- the whole service: MQTT and notify_url ---------------------------------------------------


@pytest.fixture
async def sender_hook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with served(app) as port:
        yield f"http://127.0.0.1:{port}/hook", got


async def test_the_sender_hears_on_mqtt_and_its_notify_url(
        tmp_path: Path, broker: Broker, sender_hook: tuple[str, list[dict[str, Any]]]) -> None:
    url, posted = sender_hook
    path = service_config(tmp_path, mqtt_port=broker.port)
    raw = yaml.safe_load(path.read_text())
    raw["forces"]["kent"]["notify_url"] = url
    for _fid, force in raw["forces"].items():
        force["cad"] = {"adapter": "sim", "options": {"latency_s": 0}}
    raw["service"]["tokens"].append({"env": "T_MET", "role": "partner:met"})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    sim.reset()
    heard: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as mqtt:
        await mqtt.subscribe("overflow/handoffs/kent/status", qos=1)

        async def listen() -> None:
            async for message in mqtt.messages:
                heard.append(json.loads(bytes(message.payload)))  # type: ignore[arg-type]

        listener = asyncio.create_task(listen())
        env = {**environ(), "T_MET": "met-secret"}
        async with running_service(path, env) as api:
            status, body = await api.call("POST", "/v1/handoffs", "partner:kent",
                                          json=incident(8))
            assert status == 202, body
            hid = body["id"]

            async def delivered() -> bool:
                return (await api.call("GET", f"/v1/handoffs/{hid}", "viewer"))[1][
                    "status"] == "delivered"
            await wait_for(delivered)
            api.tokens["partner:met"] = "met-secret"
            status, body = await api.call("POST", f"/v1/handoffs/{hid}/acknowledgement",
                                          "partner:met", json=ACCEPT)
            assert status == 200, body
            await wait_for(lambda: [m["status"] for m in heard] == ["delivered",
                                                                    "acknowledged"])
            await wait_for(lambda: [m["status"] for m in posted] == ["delivered",
                                                                     "acknowledged"])
        listener.cancel()
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    answers = [r for r in audit if r["kind"] == "answer"]
    assert [(r["handoff_id"], r["status"], r["by"]) for r in answers] == [
        (hid, "acknowledged", "PC 1234 Smith")]


# ---- answers heard by adapters, through the real desk ---------------------------------------


async def test_sim_dispatchers_answer_through_the_desk(tmp_path: Path) -> None:
    config = make_config(tmp_path, cads={"met": {"adapter": "sim", "options": {
        "latency_s": 0, "ack_after_s": 0.05, "complete_after_s": 0.05, "seed": 3}}})
    async with desk_at(config) as api:
        hid = await api.hand_over(9)

        async def completed() -> bool:
            return await api.status(hid) == "completed"
        await wait_for(completed)
        _, body = await api.call("GET", f"/v1/handoffs/{hid}", "kent")
        assert body["acknowledgement"]["outcome"] == "accepted"
        assert body["acknowledgement"]["by"].startswith("met-dispatcher-")
        assert api.statuses_told(hid) == ["delivered", "acknowledged", "completed"]


async def test_a_ucri2_cad_transfers_acknowledges_and_completes_through_the_desk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCRI2_SECRET", "s3cret")
    transfers: list[dict[str, Any]] = []

    async def transfer(request: web.Request) -> web.Response:
        transfers.append(await request.json())
        return web.json_response({"internalId": "MET-0001"}, status=201)

    cad = web.Application()
    cad.router.add_post("/transfer", transfer)
    listen = free_port()
    async with served(cad) as cad_port:
        config = make_config(tmp_path, cads={"met": {"adapter": "ucri2", "options": {
            "url": f"http://127.0.0.1:{cad_port}/transfer", "secret_env": "UCRI2_SECRET",
            "listen_port": listen, "timeout_s": 2}}})
        async with desk_at(config) as api:
            hid = await api.hand_over(10)
            await api.delivered(hid)
            shared = transfers[0]["payload"]["data"]["sharedIncidentId"]
            assert shared.replace("-", "") == hid  # the handoff id is the shared UUID
            answers = f"http://127.0.0.1:{listen}/ucri2"
            auth = {"Authorization": "Bearer s3cret"}
            for schema, data in (
                    ("acknowledgement", {"status": "accepted", "dispatcher": "PC 7 Brown",
                                         "acknowledgedByDispatcherAt": "2025-03-25T21:40:05Z"}),
                    ("completion", {"status": "completed_sucessfully",
                                    "completedAt": "2025-03-25T22:15:00Z"})):
                async with api.session.post(answers, headers=auth, json={"payload": {
                        "schemaId": schema, "schemaVersion": "1.0",
                        "contentType": "application/json",
                        "data": {"sharedIncidentId": shared, **data}}}) as resp:
                    assert resp.status in (200, 202), await resp.text()
            assert await api.status(hid) == "completed"
            _, body = await api.call("GET", f"/v1/handoffs/{hid}", "view")
            assert body["acknowledgement"]["by"] == "PC 7 Brown"
            assert body["acknowledgement"]["answered_at"] == "2025-03-25T21:40:05.000Z"


async def test_an_answer_given_to_another_router_stops_the_deadline_here(
        tmp_path: Path, pg_dsn: str) -> None:
    """Two routers on one PostgreSQL: A delivered a P1 and watches its 2 s deadline for an
    answer; the dispatcher's answer reaches B. A lets it go within a claims round, so nobody
    escalates a handoff a person has taken."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with desk_at(make_config(tmp_path / "a", store=pg_dsn,
                                   ack_deadlines_s={"P1": 2.0})) as a, \
            desk_at(make_config(tmp_path / "b", store=pg_dsn,
                                ack_deadlines_s={"P1": 2.0})) as b:
        hid = await a.hand_over(1)
        await a.delivered(hid)
        status, body = await b.call("POST", f"/v1/handoffs/{hid}/acknowledgement", "met",
                                    ACCEPT)
        assert status == 200 and body["status"] == "acknowledged", body
        await asyncio.sleep(3.0)  # past the deadline
        assert await a.status(hid) == "acknowledged"
    assert not [x for x in a.alerts + b.alerts if x.get("kind") == "handoff_escalated"]
