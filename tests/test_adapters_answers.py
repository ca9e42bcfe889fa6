"""Answers from people at the destination (acknowledgement, rejection, completion) as each
adapter hears them, over real sockets: the ucri2 adapter's transfer, listener and status
updates; EIDO's incidentStatus on the conveyance; MQTT's answer topic; the sim's dispatchers.
Each passes what it hears to a recording AnswerSink, or to one that refuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from aiohttp import web
from conftest import Broker, free_port, served, stop_task
from handoff_support import incident

from adapters import base, sim
from adapters.base import (
    Ack,
    AdapterContext,
    AdapterUnavailable,
    Answer,
    AnswerRefused,
    Delivery,
    Refusal,
)
from adapters.eido import SUBPROTOCOL
from router.handoff.incident import Incident, handoff_id

SECRET = "ucri2-test-secret"
Sink = Callable[[Answer], Awaitable[None]]


def delivery(n: int = 1, **kw: Any) -> Delivery:
    inc = Incident.model_validate(incident(n, frm="met", to="kent", **kw)).contract_json()
    return Delivery(handoff_id(inc["from"], inc["incident_id"]), inc)


class Recorder:
    """An AnswerSink that records; `refuse` makes it raise AnswerRefused with that code."""

    def __init__(self, refuse: str | None = None, refuse_times: int = 1_000_000):
        self.answers: list[Answer] = []
        self.refuse = refuse
        self.refuse_times = refuse_times
        self.calls = 0

    async def __call__(self, answer: Answer) -> None:
        self.calls += 1
        if self.refuse and self.calls <= self.refuse_times:
            raise AnswerRefused(self.refuse, f"refused: {self.refuse}")
        self.answers.append(answer)


def context(sink: Sink, force: str = "kent") -> AdapterContext:
    return AdapterContext(force, Path("/nonexistent"), answer=sink)


@pytest.fixture(autouse=True)
def quick_not_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wait out the answer-before-delivered race briefly, so refusals are answered fast."""
    monkeypatch.setattr(base, "NOT_YET_DELIVERED_WAITS_S", (0.01, 0.02))


async def until(ok: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not ok():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---- ucri2: the destination CAD and the sender's CAD as HTTP servers ----------------------


class Ucri2Cad:
    """Takes UCRI2 envelopes on /transfer and /status; `status` is what it answers."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.status = 201
        self.body: dict[str, Any] = {"internalId": "KENT-0042"}
        self.slow_s = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.path, dict(request.headers), await request.json()))
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
        return web.json_response(self.body, status=self.status)


@pytest.fixture
async def ucri2_cad() -> AsyncIterator[tuple[Ucri2Cad, str]]:
    cad = Ucri2Cad()
    app = web.Application()
    app.router.add_post("/transfer", cad.handle)
    app.router.add_post("/status", cad.handle)
    async with served(app) as port:
        yield cad, f"http://127.0.0.1:{port}"


def ucri2(url: str, sink: Sink, **options: Any) -> Any:
    return base.build("ucri2", {"url": f"{url}/transfer", "secret_env": "UCRI2_SECRET",
                                "timeout_s": 0.5, **options}, context(sink))


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCRI2_SECRET", SECRET)


async def test_ucri2_transfer_maps_the_incident_and_reads_the_answer(
        ucri2_cad: tuple[Ucri2Cad, str], secret: None) -> None:
    cad, url = ucri2_cad
    adapter = ucri2(url, Recorder())
    d = delivery(1)
    try:
        outcome = await adapter.deliver(d)
        cad.status, cad.body = 409, {}
        again = await adapter.deliver(d)
        cad.status, cad.body = 422, {"message": "no such classification"}
        refused = await adapter.deliver(delivery(2))
        cad.status = 503
        with pytest.raises(AdapterUnavailable, match="503"):
            await adapter.deliver(delivery(3))
        cad.status, cad.slow_s = 201, 2.0
        with pytest.raises(AdapterUnavailable):
            await adapter.deliver(delivery(4))  # timeout_s 0.5
    finally:
        await adapter.aclose()
    assert outcome == Ack(reference="KENT-0042") and again == Ack(duplicate=True)
    assert isinstance(refused, Refusal) and "no such classification" in refused.reason
    path, headers, env = cad.received[0]
    assert path == "/transfer" and headers["Authorization"] == f"Bearer {SECRET}"
    assert headers["Idempotency-Key"] == d.key
    assert env["payload"]["schemaId"] == "incident" and env["source"] == "overflow-router"
    data = env["payload"]["data"]
    assert data["sharedIncidentId"] == str(uuid.UUID(hex=d.key))
    assert data["internalId"] == "MET-000001" and data["flashingLights"] is True
    assert data["startTimestamp"] == d.incident["opened_at"]
    assert data["classifications"] == ["burglary"] and data["issue"] == d.incident["summary"]
    assert data["missionLocation"] == {"coordinate": {"lat": 51.2, "lon": 0.5},
                                       "address": {"street": "1 High St, Maidstone"}}
    assert data["informers"] == [{"name": "A Caller", "phone": "+44 7700 900123"}]
    assert {"from:met", "to:kent", "priority:P1"} <= set(env["tags"])


async def test_ucri2_transfer_to_nobody_is_unavailable() -> None:
    adapter = ucri2(f"http://127.0.0.1:{free_port()}", Recorder())
    try:
        with pytest.raises(AdapterUnavailable):
            await adapter.deliver(delivery(1))
    finally:
        await adapter.aclose()


def ack_envelope(key: str, **data: Any) -> dict[str, Any]:
    body = {"sharedIncidentId": str(uuid.UUID(hex=key)),
            "acknowledgedByDispatcherAt": "2025-03-25T21:40:05Z", "status": "accepted", **data}
    return {"messageId": str(uuid.uuid4()), "source": "1.2.3",
            "payload": {"schemaId": "acknowledgement", "schemaVersion": "1.0",
                        "contentType": "application/json", "data": body}}


def completion_envelope(key: str, as_text: bool = False, **data: Any) -> dict[str, Any]:
    body = {"sharedIncidentId": str(uuid.UUID(hex=key)), "completedAt": "2025-03-25T22:15:00Z",
            "status": "completed_sucessfully", **data}
    return {"payload": {"schemaId": "completion", "schemaVersion": "1.0",
                        "contentType": "application/json",
                        "data": json.dumps(body) if as_text else body}}


@contextlib.asynccontextmanager
async def listening(sink: Sink) -> AsyncIterator[tuple[Any, str]]:
    port = free_port()
    adapter = ucri2("http://127.0.0.1:9", sink, listen_port=port)
    await adapter.start()
    try:
        yield adapter, f"http://127.0.0.1:{port}/ucri2"
    finally:
        await adapter.aclose()


async def post(url: str, body: Any, token: str | None = SECRET) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_ucri2_listener_maps_acknowledgements_and_completions(secret: None) -> None:
    sink = Recorder()
    k1, k2, k3 = delivery(1).key, delivery(2).key, delivery(3).key
    async with listening(sink) as (_, url):
        for body in (ack_envelope(k1, dispatcher="PC 123", incidentReference="KENT-7"),
                     ack_envelope(k2, status="rejected", cause="location outside our area"),
                     completion_envelope(k1, additionalInformation="arrest made"),
                     completion_envelope(k3, as_text=True, status="aborted"),
                     completion_envelope(k1, status="completed_successfully")):
            status, answer = await post(url, body)
            assert status == 200 and answer["result"] == "recorded", answer
    at_ack = 1742938805.0  # 2025-03-25T21:40:05Z
    assert sink.answers[:4] == [
        Answer(k1, "acknowledgement", "accepted", at=at_ack, by="PC 123", reference="KENT-7"),
        Answer(k2, "acknowledgement", "rejected", at=at_ack,
               cause="location outside our area"),
        Answer(k1, "completion", "completed", at=1742940900.0, note="arrest made"),
        Answer(k3, "completion", "aborted", at=1742940900.0)]
    assert sink.answers[4].outcome == "completed"


@pytest.mark.parametrize(("body", "field"), [
    (ack_envelope("0" * 32, acknowledgedByDispatcherAt=None), "acknowledgedByDispatcherAt"),
    (ack_envelope("0" * 32, status="rejected"), "payload.data.cause"),
    (ack_envelope("0" * 32, status="maybe"), "payload.data.status"),
    (ack_envelope("0" * 32, sharedIncidentId="not-a-uuid"), "payload.data.sharedIncidentId"),
    (ack_envelope("0" * 32, acknowledgedByDispatcherAt="2025-03-25T21:40:05"),
     "payload.data.acknowledgedByDispatcherAt"),  # no zone: ambiguous across a border
    (ack_envelope("0" * 32, cause="a\x00b"), "payload.data.cause"),
    (ack_envelope("0" * 32, colour="blue"), "payload.data.colour"),
    (completion_envelope("0" * 32, status="done"), "payload.data.status"),
    ({"payload": {"schemaId": "incident", "data": {}}}, "payload.schemaId"),
    ({"payload": {"schemaId": "completion", "data": "{not json"}}, "payload.data"),
    ({"nothing": 1}, "payload"),
])
async def test_ucri2_listener_names_the_field_at_fault(secret: None, body: dict[str, Any],
                                                       field: str) -> None:
    sink = Recorder()
    async with listening(sink) as (_, url):
        status, answer = await post(url, body)
    assert status == 400 and answer["error"] == "invalid"
    assert answer["field"].startswith(field) or field in answer["field"], answer
    assert not sink.calls


async def test_ucri2_listener_wants_the_bearer_and_json(secret: None) -> None:
    sink = Recorder()
    key = delivery(1).key
    async with listening(sink) as (_, url):
        assert (await post(url, ack_envelope(key), token=None))[0] == 401
        assert (await post(url, ack_envelope(key), token="wrong"))[0] == 401
        status, answer = await post(url, b"{not json")
        assert status == 400 and answer["error"] == "invalid"
        assert (await post(url, b"x" * 100_000))[0] == 413
    assert not sink.calls


@pytest.mark.parametrize(("code", "http"), [("not_found", 404), ("forbidden", 403),
                                            ("not_delivered", 409), ("conflict", 409),
                                            ("invalid", 400)])
async def test_ucri2_listener_maps_refusals(secret: None, code: str, http: int) -> None:
    async with listening(Recorder(refuse=code)) as (_, url):
        status, answer = await post(url, ack_envelope(delivery(1).key))
    assert (status, answer["error"]) == (http, code)
    assert answer["message"] == f"refused: {code}"


async def test_an_answer_that_overtakes_its_delivery_is_recorded_once_delivered(
        secret: None) -> None:
    sink = Recorder(refuse="not_delivered", refuse_times=2)  # the desk catches up
    async with listening(sink) as (_, url):
        status, _ = await post(url, ack_envelope(delivery(1).key))
    assert status == 200 and sink.calls == 3 and len(sink.answers) == 1


async def test_ucri2_listener_starts_with_the_first_delivery_and_stops_on_close(
        ucri2_cad: tuple[Ucri2Cad, str], secret: None) -> None:
    _, url = ucri2_cad
    port = free_port()
    sink = Recorder()
    adapter = ucri2(url, sink, listen_port=port)
    answers = f"http://127.0.0.1:{port}/ucri2"
    with pytest.raises(aiohttp.ClientConnectionError):  # built without I/O: nothing yet
        await post(answers, ack_envelope(delivery(1).key))
    try:
        await adapter.deliver(delivery(1))
        assert (await post(answers, ack_envelope(delivery(1).key)))[0] == 200
    finally:
        await adapter.aclose()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(answers, ack_envelope(delivery(1).key))
    assert len(sink.answers) == 1


def test_ucri2_listener_needs_a_secret() -> None:
    problems = base.check({"kent": ("ucri2", {"url": "http://cad", "listen_port": 8443})})
    assert problems and "secret_env" in problems[0]
    assert not base.check({"kent": ("ucri2", {"url": "http://cad"})})
    assert "ucri2" in base.available()


def status(what: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"handoff_id": key, "incident_id": "MET-000001", "from": "met", "to": "kent",
            "priority": "P1", "status": what, "at": "2025-03-25T21:40:05.000Z", **extra}


async def test_ucri2_update_tells_the_senders_cad(ucri2_cad: tuple[Ucri2Cad, str],
                                                  secret: None) -> None:
    cad, url = ucri2_cad
    key = delivery(1).key
    shared = str(uuid.UUID(hex=key))
    quiet = ucri2(url, Recorder())  # no status_url: updates go nowhere
    adapter = ucri2(url, Recorder(), status_url=f"{url}/status")
    try:
        await quiet.update(status("acknowledged", key))
        assert cad.received == []
        await adapter.update(status("acknowledged", key, by="PC 123", reference="KENT-7"))
        await adapter.update(status("rejected", key, by="PC 9", cause="not our area"))
        await adapter.update(status("completed", key, outcome="aborted", note="nobody there"))
        await adapter.update(status("completed", key, outcome="completed"))
        await adapter.update(status("escalated", key, cause="no acknowledgement in 120 s"))
        cad.status = 400
        await adapter.update(status("delivered", key))  # refused for good: logged, dropped
        cad.status = 502
        with pytest.raises(AdapterUnavailable, match="502"):
            await adapter.update(status("delivered", key))
    finally:
        await quiet.aclose()
        await adapter.aclose()
    sent = [(env["payload"]["schemaId"], env["payload"]["data"]) for path, _, env
            in cad.received]
    assert all(path == "/status" for path, _, _ in cad.received)
    assert sent[:5] == [
        ("acknowledgement", {"sharedIncidentId": shared, "status": "accepted",
                             "acknowledgedByDispatcherAt": "2025-03-25T21:40:05.000Z",
                             "dispatcher": "PC 123", "incidentReference": "KENT-7"}),
        ("acknowledgement", {"sharedIncidentId": shared, "status": "rejected",
                             "acknowledgedByDispatcherAt": "2025-03-25T21:40:05.000Z",
                             "dispatcher": "PC 9", "cause": "not our area"}),
        ("completion", {"sharedIncidentId": shared, "status": "aborted",
                        "completedAt": "2025-03-25T21:40:05.000Z",
                        "additionalInformation": "nobody there"}),
        ("completion", {"sharedIncidentId": shared, "status": "completed_sucessfully",
                        "completedAt": "2025-03-25T21:40:05.000Z"}),
        ("handoff_status", {"sharedIncidentId": shared, "status": "escalated",
                            "statusAt": "2025-03-25T21:40:05.000Z",
                            "cause": "no acknowledgement in 120 s"})]
    assert "incident:MET-000001" in cad.received[0][2]["tags"]


# ---- EIDO: incidentStatus on the conveyance ----------------------------------------------


class EidoCad:
    """Subscribes, acknowledges events, and sends `statuses` (queued by the test) on the same
    WebSocket, collecting the router's incidentStatusResponses."""

    def __init__(self) -> None:
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.responses: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        await ws.send_json({"subscribe": {"requestId": "r1", "requestType": "subscribe"}})

        async def send_statuses() -> None:
            while True:
                await ws.send_json({"incidentStatus": await self.statuses.get()})

        sender = asyncio.create_task(send_statuses())
        try:
            async for msg in ws:
                data = json.loads(msg.data)
                if "event" in data:
                    self.events.append(data["event"])
                    await ws.send_json({"eventResponse": {
                        "transactionId": data["event"]["transactionId"], "statusCode": 201,
                        "incidentReference": "KENT-E1"}})
                elif "incidentStatusResponse" in data:
                    self.responses.append(data["incidentStatusResponse"])
        finally:
            await stop_task(sender)
        return ws


@pytest.fixture
async def eido_cad() -> AsyncIterator[EidoCad]:
    cad = EidoCad()
    app = web.Application()
    app.router.add_get("/eido", cad.handle)
    async with served(app) as cad.port:
        yield cad


def eido(cad: EidoCad, sink: Sink) -> Any:
    return base.build("eido", {"url": f"ws://127.0.0.1:{cad.port}/eido",
                               "connect_timeout_s": 1, "subscribe_timeout_s": 1},
                      context(sink))


async def test_eido_incident_status_becomes_answers(eido_cad: EidoCad) -> None:
    sink = Recorder()
    adapter = eido(eido_cad, sink)
    d1, d2 = delivery(1), delivery(2)
    try:
        assert await adapter.deliver(d1) == Ack(reference="KENT-E1")
        for n, body in enumerate([
                {"transactionId": d1.key, "status": "accepted", "agentIdentifier": "PC 123",
                 "statusTimestamp": "2025-03-25T21:40:05Z", "incidentReference": "KENT-7"},
                {"transactionId": str(uuid.UUID(hex=d2.key)), "status": "rejected",
                 "reasonText": "location unknown"},
                {"transactionId": d1.key, "status": "completed", "noteText": "closed",
                 "statusTimestamp": "2025-03-25T22:15:00+00:00"},
                {"transactionId": d1.key, "status": "rejected"},  # no reasonText
                {"transactionId": "nope", "status": "accepted"},
                {"transactionId": d1.key, "status": "completed",
                 "statusTimestamp": "yesterday"}]):
            await eido_cad.statuses.put({"requestId": f"s{n}", **body})
        await until(lambda: len(eido_cad.responses) == 6)
        assert await adapter.deliver(d2) == Ack(reference="KENT-E1")  # the link still works
    finally:
        await adapter.aclose()
    codes = {r["requestId"]: (r["statusCode"], r.get("statusText", "")) for r in
             eido_cad.responses}
    assert [codes[f"s{n}"][0] for n in range(6)] == [200, 200, 200, 400, 400, 400]
    assert "reasonText" in codes["s3"][1] and "transactionId" in codes["s4"][1]
    assert "statusTimestamp" in codes["s5"][1]
    assert sorted(sink.answers, key=lambda a: (a.kind, a.handoff_id)) == sorted([
        Answer(d1.key, "acknowledgement", "accepted", at=1742938805.0, by="PC 123",
               reference="KENT-7"),
        Answer(d2.key, "acknowledgement", "rejected", cause="location unknown"),
        Answer(d1.key, "completion", "completed", at=1742940900.0, note="closed")],
        key=lambda a: (a.kind, a.handoff_id))


async def test_eido_refused_answer_and_a_link_kept_open_without_deliveries(
        eido_cad: EidoCad) -> None:
    adapter = eido(eido_cad, Recorder(refuse="forbidden"))
    try:
        await adapter.start()  # answers for handoffs sent before a restart
        await adapter.start()  # idempotent
        await eido_cad.statuses.put({"requestId": "x", "transactionId": delivery(1).key,
                                     "status": "accepted"})
        await until(lambda: len(eido_cad.responses) == 1)
    finally:
        await adapter.aclose()
    assert eido_cad.events == []
    assert eido_cad.responses[0]["statusCode"] == 403
    assert eido_cad.responses[0]["transactionId"] == delivery(1).key


# ---- MQTT: the answer topic ---------------------------------------------------------------


def mqtt(broker: Broker, sink: Sink) -> Any:
    return base.build("mqtt", {"host": broker.host, "port": broker.port, "ack_timeout_s": 2,
                               "connect_timeout_s": 1}, context(sink))


@pytest.mark.services
async def test_mqtt_answers_are_passed_on_and_malformed_ones_counted(broker: Broker) -> None:
    sink = Recorder()
    adapter = mqtt(broker, sink)
    key = delivery(1).key
    results: list[dict[str, Any]] = []
    try:
        await adapter.start()
        await until(lambda: adapter._sessions._link is not None)
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as cad:
            await cad.subscribe("overflow/handoffs/kent/answer/result", qos=1)
            for body in [
                    b"not json at all",
                    json.dumps({"handoff_id": key, "kind": "acknowledgement",
                                "outcome": "completed"}).encode(),
                    json.dumps({"handoff_id": key, "kind": "acknowledgement",
                                "outcome": "rejected"}).encode(),  # no cause
                    json.dumps({"handoff_id": key, "kind": "acknowledgement",
                                "outcome": "accepted", "by": "PC 123",
                                "at": "2025-03-25T21:40:05Z", "reference": "KENT-7"}).encode(),
                    json.dumps({"handoff_id": str(uuid.UUID(hex=key)), "kind": "completion",
                                "outcome": "aborted", "at": 1742940900,
                                "note": "nobody there"}).encode()]:
                await cad.publish("overflow/handoffs/kent/answer", body, qos=1)
            async with asyncio.timeout(5):
                async for message in cad.messages:
                    results.append(json.loads(message.payload))
                    if len(results) == 5:
                        break
    finally:
        await adapter.aclose()
    assert adapter.answers_malformed == 3
    assert sorted(r["result"] for r in results) == ["invalid"] * 3 + ["recorded"] * 2
    assert any(r.get("field") == "outcome" for r in results)
    assert any(r.get("field") == "cause" for r in results)
    assert sink.answers == [
        Answer(key, "acknowledgement", "accepted", at=1742938805.0, by="PC 123",
               reference="KENT-7"),
        Answer(key, "completion", "aborted", at=1742940900.0, note="nobody there")]


@pytest.mark.services
async def test_mqtt_refused_answer_is_reported_back(broker: Broker) -> None:
    adapter = mqtt(broker, Recorder(refuse="forbidden"))
    key = delivery(1).key
    try:
        await adapter.start()
        await until(lambda: adapter._sessions._link is not None)
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as cad:
            await cad.subscribe("overflow/handoffs/kent/answer/result", qos=1)
            await cad.publish("overflow/handoffs/kent/answer", json.dumps(
                {"handoff_id": key, "kind": "acknowledgement", "outcome": "accepted"}), qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(cad.messages))
    finally:
        await adapter.aclose()
    result = json.loads(message.payload)
    assert result == {"handoff_id": key, "kind": "acknowledgement", "result": "forbidden",
                      "message": "refused: forbidden"}
    assert adapter.answers_refused == 1


# ---- the sim CAD's dispatchers -----------------------------------------------------------


@pytest.fixture
def fresh_sims() -> Iterator[None]:
    sim.reset()
    yield
    sim.reset()


def sim_adapter(sink: Sink, **options: Any) -> Any:
    return base.build("sim", {"latency_s": 0, "seed": 7, **options}, context(sink))


async def test_sim_dispatchers_accept_then_complete(fresh_sims: None) -> None:
    sink = Recorder()
    adapter = sim_adapter(sink, ack_after_s=0.05, answer_jitter_s=0.02, complete_after_s=0.05)
    d = delivery(1)
    try:
        assert isinstance(await adapter.deliver(d), Ack)
        assert (await adapter.deliver(d)).duplicate  # a redelivery is not answered twice
        await until(lambda: len(sink.answers) == 2)
        await asyncio.sleep(0.2)
    finally:
        await adapter.aclose()
    ack, done = sink.answers
    assert (ack.kind, ack.outcome, done.kind, done.outcome) == (
        "acknowledgement", "accepted", "completion", "completed")
    assert ack.by.startswith("kent-dispatcher-") and ack.reference == "SIM-1"
    cad = sim.sim_cad("kent")
    assert cad.answers == sink.answers
    assert 0.03 <= cad.ack_delays_s[d.key] < 0.5


async def test_sim_dispatchers_reject_with_a_cause_and_never_complete(fresh_sims: None) -> None:
    sink = Recorder()
    adapter = sim_adapter(sink, ack_after_s=0.01, complete_after_s=0.01, reject_share=1)
    try:
        await adapter.deliver(delivery(1))
        await until(lambda: len(sink.answers) == 1)
        await asyncio.sleep(0.1)
    finally:
        await adapter.aclose()
    assert [(a.outcome, a.cause) for a in sink.answers] == [
        ("rejected", "location outside our area")]


async def test_sim_answers_nothing_by_default_and_stops_on_close(fresh_sims: None) -> None:
    quiet_sink, slow_sink = Recorder(), Recorder()
    quiet = sim_adapter(quiet_sink)
    slow = base.build("sim", {"latency_s": 0, "ack_after_s": 30}, context(slow_sink, "city"))
    await quiet.deliver(delivery(1))
    await slow.deliver(delivery(2))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await slow.aclose()  # the pending answer is cancelled, not waited for
    await quiet.aclose()
    assert time.monotonic() - started < 1
    assert quiet_sink.calls == slow_sink.calls == 0
    assert not sim.sim_cad("city").ack_delays_s


async def test_sim_answer_refused_is_counted(fresh_sims: None) -> None:
    adapter = sim_adapter(Recorder(refuse="not_found"), ack_after_s=0.01)
    try:
        await adapter.deliver(delivery(1))
        await until(lambda: sim.sim_cad("kent").answers_refused == 1)
    finally:
        await adapter.aclose()
    assert sim.sim_cad("kent").answers == []
