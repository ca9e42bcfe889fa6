"""Hostile input to the handoff desk, against the real stores (SQLite and PostgreSQL) and real
HTTP on loopback: text no store can hold, one bad row among many good ones, a resubmission that
changes the incident, and CADs that answer with garbage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import asyncpg
import pytest
from aiohttp import web
from conftest import served
from handoff_support import handoff_app, inc, incident, make_config
from pydantic import ValidationError

from adapters import base, sim
from adapters.base import Ack, AdapterContext, AdapterUnavailable, Delivery, Refusal
from adapters.eido import SUBPROTOCOL
from router.config import Token
from router.handoff.desk import HandoffDesk, open_desk
from router.handoff.incident import Incident, differences, handoff_id
from router.handoff.store import (
    HandoffStore,
    HistoryEntry,
    StatusChange,
    StoredHandoff,
    StoreError,
    open_store,
)
from router.http.auth import TokenBook

GOOD = 150  # concurrent good submissions around each bad one
GARBAGE = b"\xff\xfe\x00garbage"  # not UTF-8, not JSON, and a NUL


@pytest.fixture(autouse=True)
def fresh_sim_cads() -> None:
    sim.reset()


# ---- a desk behind real HTTP -----------------------------------------------------------------

TOKENS_ENV = {"T_KENT": "kent-secret", "T_ESSEX": "essex-secret", "T_VIEW": "view-secret"}


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    desk: HandoffDesk

    async def post(self, body: Any, token: str = "kent-secret") -> tuple[int, Any]:
        kw = {"data": body} if isinstance(body, (str, bytes)) else {"json": body}
        async with self.session.post(self.base + "/v1/handoffs", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                **kw) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def api(tmp_path: Path, store_url: str) -> AsyncIterator[Api]:
    """The handoff API on the real store; met's CAD down, so handoffs stay put."""
    book = TokenBook((Token(env="T_KENT", role="partner:kent"),
                      Token(env="T_ESSEX", role="partner:essex"),
                      Token(env="T_VIEW", role="viewer")), TOKENS_ENV)
    async with open_desk(make_config(tmp_path, store_url), alert=lambda a: None,
                         cad_up=lambda force: force != "met") as desk:
        connector = aiohttp.TCPConnector(limit=0)
        async with served(handoff_app(desk, book)) as port, \
                aiohttp.ClientSession(connector=connector,
                                      timeout=aiohttp.ClientTimeout(total=30)) as s:
            yield Api(f"http://127.0.0.1:{port}", s, desk)


# ---- 1a: text no store can hold is refused where it enters ---------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"summary": "before\x00after"}, "summary"),
    ({"summary": "lone \ud800 high"}, "summary"),
    ({"category": "lone \udc00 low"}, "category"),
    ({"call_id": "call\x00"}, "call_id"),
    ({"location": {"address": "1 High St\x00"}}, "location.address"),
    ({"caller": {"name": "A \udfff Caller"}}, "caller.name"),
])
async def test_unstorable_text_is_a_400_naming_its_field(api: Api, change: dict[str, Any],
                                                         field: str) -> None:
    status, body = await api.post(incident(1) | change)  # json.dumps sends "\u0000", "\ud800"
    assert status == 400
    if body["error"] != "malformed_json":  # a strict JSON parser refuses "\ud800" itself
        assert (body["error"], body["field"]) == ("invalid", field)
        assert body["message"].startswith(f"{field}: ")
    assert await api.desk.query(limit=10) == []


async def test_escaped_surrogate_pairs_and_other_controls_are_stored(api: Api) -> None:
    summary = "siren \U0001f6a8, tab\tand \x01"
    raw = json.dumps(incident(1, summary=summary))  # the emoji as the pair "\ud83d\udea8"
    assert "\\ud83d\\udea8" in raw
    status, body = await api.post(raw)
    assert status == 202 and body["incident"]["summary"] == summary
    found = await api.desk.get(body["id"])
    assert found is not None and found["incident"]["summary"] == summary


# ---- 1b: one bad row never fails its neighbours ----------------------------------------------


def row(n: int, **kw: Any) -> StoredHandoff:
    values: dict[str, Any] = {
        "id": f"h{n:05d}", "from_force": "kent", "incident_id": f"KENT-{n}", "to_force": "met",
        "priority": "P2", "status": "accepted",
        "incident": {"incident_id": f"KENT-{n}", "from": "kent", "summary": "fine"},
        "accepted_at": 1000.0 + n, "updated_at": 1000.0 + n,
        "history": [HistoryEntry(1000.0 + n, "accepted", "from kent")]} | kw
    return StoredHandoff(**values)


async def test_a_bad_row_fails_alone_in_a_group_commit(store_url: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    postgres = store_url.startswith("postgres")
    # no store holds a lone surrogate in a key; PostgreSQL's jsonb holds no NUL either
    unencodable = row(90001, incident_id="KENT-\ud800")
    nul = row(90002, incident={"incident_id": "KENT-90002", "summary": "a\x00b"})
    async with open_store(store_url) as store:
        for n in range(10):
            assert await store.insert(row(n))
        results = await asyncio.gather(
            *(store.insert(row(n)) for n in range(10, 10 + GOOD // 2)),
            store.insert(unencodable),
            *(store.record(StatusChange(f"h{n:05d}", "held", 2000.0, "down")) for n in range(10)),
            store.insert(nul),
            *(store.insert(row(n)) for n in range(10 + GOOD // 2, 10 + GOOD)),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, StoreError) for r in failed)
        assert len(failed) == (2 if postgres else 1)
        assert isinstance(results[GOOD // 2], StoreError)
        stored = {h.id: h for h in await store.query(limit=1000)}
        assert {f"h{n:05d}" for n in range(10 + GOOD)} <= set(stored)
        assert all(stored[f"h{n:05d}"].status == "held" for n in range(10))
        assert ("h90002" in stored) is not postgres
        assert "h90001" not in stored
        assert await store.insert(row(99999))  # and the writer carries on
    assert "committing them one by one" in caplog.text


async def test_an_outage_fails_the_rest_of_a_batch_at_once(tmp_path: Path) -> None:
    """Not a row's fault: one failed single commit is enough, not one timeout per row."""
    async with open_store(f"sqlite:///{tmp_path / 'h.db'}") as store:
        flushes = 0
        real_flush = store._flush

        async def failing(*args: Any) -> Any:
            nonlocal flushes
            flushes += 1
            raise sqlite3.OperationalError("disk I/O error")

        store._flush = failing
        results = await asyncio.gather(*(store.insert(row(n)) for n in range(20)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        assert flushes == 2  # the batch, then the first row alone
        store._flush = real_flush
        assert await store.insert(row(1))


@contextlib.asynccontextmanager
async def writes_held(store_url: str) -> AsyncIterator[None]:
    """Another client holds the database's write lock, as a long transaction would: commits
    wait, and what arrives meanwhile queues up into one batch."""
    if store_url.startswith("postgres"):
        pg = await asyncpg.connect(store_url, timeout=5)
        try:
            async with pg.transaction():
                await pg.execute("LOCK TABLE handoffs IN SHARE ROW EXCLUSIVE MODE")
                yield
        finally:
            await pg.close()
    else:
        async with aiosqlite.connect(store_url.removeprefix("sqlite:///"),
                                     isolation_level=None) as db:
            await db.execute("BEGIN IMMEDIATE")
            yield
            await db.execute("ROLLBACK")


async def queued(store: HandoffStore, rows: int) -> None:
    """Until `rows` wait in the store's queue, or at most 2 s (under the writer's busy
    timeout): the flood is then behind the lock, or as much of it as will be."""
    for _ in range(400):
        if store._queue.qsize() >= rows:
            return
        await asyncio.sleep(0.005)


async def test_a_bad_incident_among_concurrent_posts_fails_alone(
        api: Api, store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The testers' case: an incident the database refuses, amid a flood from partners.
    (SQLite holds what PostgreSQL refuses here, escaped in its JSON text: there it is stored.)"""
    postgres = store_url.startswith("postgres")
    store = api.desk.store

    async def bad_one(n: int, after: int) -> BaseException | None:
        """Past the validator, as a bug might let it, amid the queued flood."""
        await queued(store, after)
        bad = inc(n).model_copy(update={"summary": "NUL \x00 here", "category": "odd \ud800"})
        try:
            await api.desk.submit(bad)
        except StoreError as exc:
            return exc
        return None

    posts = [api.post(incident(n, frm="kent")) for n in range(GOOD // 2)] + [
        api.post(incident(n, frm="essex"), "essex-secret") for n in range(GOOD // 2)]
    hostile = [api.post(incident(n, summary="\x00")) for n in range(5)]
    async with writes_held(store_url):
        flood = asyncio.gather(bad_one(90000, 20), *posts[:50], bad_one(90001, 80),
                               *posts[50:], *hostile)
        await queued(store, GOOD)
    results = await flood
    assert [isinstance(results[i], StoreError) for i in (0, 51)] == [postgres, postgres]
    good = [r for r in results[1:] if isinstance(r, tuple)]
    assert sorted(status for status, _ in good) == [202] * GOOD + [400] * 5
    stored = await api.desk.query(limit=1000)
    assert len(stored) == GOOD + (0 if postgres else 2)
    assert {h["incident"]["incident_id"] for h in stored} >= {
        f"{frm}-{n:06d}" for frm in ("KENT", "ESSEX") for n in range(GOOD // 2)}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in errors)  # no traceback for anything a caller sent
    if postgres:
        assert "committing them one by one" in caplog.text


# ---- 2: a resubmission that changes the incident is a conflict -------------------------------


async def test_same_content_in_another_spelling_is_the_same_handoff(api: Api) -> None:
    original = incident(1, opened_at="2025-03-25T21:36:00Z")
    status, first = await api.post(original)
    assert status == 202
    respelled = json.dumps(original | {"opened_at": "2025-03-25T22:36:00+01:00",
                                       "location": {"address": "1 High St, Maidstone",
                                                    "lon": 0.50, "lat": 51.2}},
                           sort_keys=True, indent=3).replace('"lon": 0.5', '"lon": 0.500')
    assert '"lon": 0.500' in respelled
    status, again = await api.post(respelled)
    assert (status, again["id"], again["status"]) == (200, first["id"], first["status"])
    no_caller = incident(2) | {"caller": None}
    assert (await api.post(no_caller))[0] == 202
    assert (await api.post({k: v for k, v in no_caller.items() if k != "caller"}))[0] == 200


async def test_same_key_other_content_is_a_409_naming_the_fields(api: Api) -> None:
    status, first = await api.post(incident(1, priority="P3"))
    assert status == 202
    status, body = await api.post(incident(1, priority="P1", to="essex"))
    assert (status, body["error"], body["field"]) == (409, "conflict", "to")
    assert "to, priority" in body["message"] and first["id"] in body["message"]
    status, body = await api.post(incident(1, priority="P3") | {
        "location": {"lat": 51.2, "lon": 0.5, "address": "2 High St, Maidstone"}})
    assert (status, body["field"]) == (409, "location.address")
    found = await api.desk.get(first["id"])
    assert found is not None  # the first stands, whole
    assert (found["priority"], found["to"]) == ("P3", "met")
    assert found["incident"]["location"]["address"] == "1 High St, Maidstone"
    # another force's incident with the same number is another handoff
    assert (await api.post(incident(1, frm="essex", priority="P1"), "essex-secret"))[0] == 202


def test_fields_the_router_may_add_to_what_it_stores_are_not_compared() -> None:
    new = inc(1)
    stored = new.contract_json() | {"received_via": "router-2"}
    assert differences(new, stored) == []
    assert differences(new, stored | {"summary": "other"}) == ["summary"]
    assert differences(new, {"incident_id": "x", "summary": 3}) != []  # unreadable: differs


# ---- 3: whatever a CAD answers, its text cannot poison a status write ------------------------


@dataclass
class GarbageCad:
    """An HTTP CAD whose answers are `status` with `body`."""

    status: int = 200
    body: bytes = GARBAGE
    requests: int = 0
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.Response(status=self.status, body=self.body,
                            content_type="application/octet-stream")


@pytest.fixture
async def garbage_cad() -> AsyncIterator[GarbageCad]:
    cad = GarbageCad()
    app = web.Application()
    app.router.add_post("/incidents", cad.handle)
    async with served(app) as cad.port:
        yield cad


def http_cad_block(port: int) -> dict[str, Any]:
    return {"adapter": "http_json", "options": {"url": f"http://127.0.0.1:{port}/incidents",
                                                "timeout_s": 2}}


def delivery(n: int = 1) -> Delivery:
    inc_json = inc(n).contract_json()
    return Delivery(handoff_id(inc_json["from"], inc_json["incident_id"]), inc_json)


async def test_http_json_2xx_with_a_garbage_body_is_delivered(garbage_cad: GarbageCad) -> None:
    adapter = base.build("http_json", http_cad_block(garbage_cad.port)["options"],
                         AdapterContext("met", Path("/nonexistent")))
    try:
        assert await adapter.deliver(delivery()) == Ack()
        garbage_cad.body = b'{"reference": "CAD-\\u0000-\\ud800-9", "duplicate": "no"}'
        assert await adapter.deliver(delivery()) == Ack(reference="CAD-\ufffd-\ufffd-9")
        garbage_cad.status, garbage_cad.body = 422, GARBAGE
        refused = await adapter.deliver(delivery())
        assert isinstance(refused, Refusal) and "\x00" not in refused.reason
        garbage_cad.status = 503
        with pytest.raises(AdapterUnavailable, match=r"HTTP 503: .*garbage"):
            await adapter.deliver(delivery())
    finally:
        await adapter.aclose()


async def test_a_p1_answered_with_garbage_is_delivered_once_and_not_escalated(
        garbage_cad: GarbageCad, tmp_path: Path, store_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    garbage_cad.body = b'{"reference": "CAD-\\u0000\\udcff"}' + GARBAGE
    alerts: list[dict[str, Any]] = []
    config = make_config(tmp_path, store_url, cads={"met": http_cad_block(garbage_cad.port)})
    async with open_desk(config, alert=alerts.append, cad_up=lambda f: True) as desk:
        handoff, _ = await desk.submit(inc(1, priority="P1"))
        await desk.drained("met")
        done = await desk.get(handoff["id"])
    assert done is not None and done["status"] == "delivered" and done["attempts"] == 1
    assert garbage_cad.requests == 1 and alerts == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_refusal_in_garbage_is_stored_readably(garbage_cad: GarbageCad, tmp_path: Path,
                                                       store_url: str) -> None:
    garbage_cad.status = 422
    garbage_cad.body = b'{"message": "no \\u0000 such type \\ud800"}'
    config = make_config(tmp_path, store_url, cads={"met": http_cad_block(garbage_cad.port)})
    async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True) as desk:
        handoff, _ = await desk.submit(inc(1))
        await desk.drained("met")
        done = await desk.get(handoff["id"])
    assert done is not None and done["status"] == "failed" and garbage_cad.requests == 1
    assert done["reason"] == "HTTP 422: no \ufffd such type \ufffd"


async def test_cad_text_is_made_storable_at_the_store(store_url: str) -> None:
    async with open_store(store_url) as store:
        assert await store.insert(row(1, reason="\x00", history=[
            HistoryEntry(1.0, "accepted", "bad \udc80 byte")]))
        await store.record(StatusChange("h00001", "held", 2.0, "CAD said \x00\ud800",
                                        reason="x" * 100_000 + "\x00"))
        await store.record(StatusChange("h00001", "delivered", 3.0, "as \x00"))
        got = await store.get("h00001")
    assert got is not None and got.status == "delivered"
    assert [e.detail for e in got.history] == ["bad \ufffd byte", "CAD said \ufffd\ufffd",
                                               "as \ufffd"]
    assert len(got.reason) == 1000 and got.reason.startswith("xxx")


# ---- the same over EIDO ----------------------------------------------------------------------


@dataclass
class GarbledEidoCad:
    """An EIDO CAD that subscribes, then answers every event with `answer(event)`, as a
    binary frame (bytes) or a text frame (str)."""

    answers: list[bytes | str] = field(default_factory=list)
    events: int = 0
    port: int = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        await ws.send_json({"subscribe": {"requestId": "r1"}})
        await ws.receive_json(timeout=2)
        async for msg in ws:
            event = json.loads(msg.data)["event"]
            self.events += 1
            answer = self.answers.pop(0)
            if isinstance(answer, bytes):
                await ws.send_bytes(answer.replace(b"TID", event["transactionId"].encode()))
            else:
                await ws.send_str(answer.replace("TID", event["transactionId"]))
        return ws


@pytest.fixture
async def eido_cad() -> AsyncIterator[GarbledEidoCad]:
    cad = GarbledEidoCad()
    app = web.Application()
    app.router.add_get("/eido", cad.handle)
    async with served(app) as cad.port:
        yield cad


async def test_eido_answers_are_read_by_their_status_code(eido_cad: GarbledEidoCad) -> None:
    eido_cad.answers = [
        b'{"eventResponse": {"transactionId": "TID", "statusCode": 200, '
        b'"statusText": "OK \xff\xfe\x00", "incidentReference": "R\\u0000"}}',
        '{"eventResponse": {"transactionId": "TID", "statusCode": "201", '
        '"statusText": "\\ud800"}}',
        '{"eventResponse": {"transactionId": "TID", "statusCode": "soon"}}',
        '{"eventResponse": {"transactionId": "TID", "statusCode": 400, '
        '"statusText": "bad \\u0000 type"}}',
    ]
    adapter = base.build("eido", {"url": f"ws://127.0.0.1:{eido_cad.port}/eido",
                                  "connect_timeout_s": 2, "subscribe_timeout_s": 2},
                         AdapterContext("met", Path("/nonexistent")))
    try:
        async with asyncio.timeout(10):
            assert await adapter.deliver(delivery(1)) == Ack(reference="R\ufffd")
            assert await adapter.deliver(delivery(2)) == Ack()
            with pytest.raises(AdapterUnavailable, match="without a statusCode"):
                await adapter.deliver(delivery(3))
            refused = await adapter.deliver(delivery(4))
    finally:
        await adapter.aclose()
    assert refused == Refusal("EIDO eventResponse 400 bad \ufffd type")
    assert eido_cad.events == 4


async def test_desk_over_eido_stores_a_garbled_ack_on_the_real_store(
        eido_cad: GarbledEidoCad, tmp_path: Path, store_url: str) -> None:
    eido_cad.answers = [b'{"eventResponse": {"transactionId": "TID", "statusCode": 200, '
                        b'"incidentReference": "\\u0000\xc3("}}']
    config = make_config(tmp_path, store_url, cads={"met": {"adapter": "eido", "options": {
        "url": f"ws://127.0.0.1:{eido_cad.port}/eido"}}})
    async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True) as desk:
        handoff, _ = await desk.submit(inc(1))
        await desk.drained("met")
        done = await desk.get(handoff["id"])
    assert done is not None and done["status"] == "delivered" and eido_cad.events == 1
    assert done["history"][-1]["detail"] == "acknowledged by the CAD as \ufffd\ufffd("


@pytest.mark.parametrize(("change", "loc", "kind"), [
    ({"summary": "a\x00"}, ("summary",), "unstorable_text"),
    ({"caller": {"name": "\x00"}}, ("caller", "name"), "unstorable_text"),
    ({"location": {"address": "\x00"}}, ("location", "address"), "unstorable_text"),
    ({"summary": "\ud800"}, ("summary",), "string_unicode"),
    ({"category": "x\udc00"}, ("category",), "string_unicode"),
])
def test_the_incident_model_names_each_unstorable_part(change: dict[str, Any],
                                                       loc: tuple[str, ...], kind: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Incident.model_validate(incident(1) | change)
    assert [(e["loc"], e["type"]) for e in refused.value.errors()] == [(loc, kind)]
