"""CAD adapters against real endpoints on loopback: an HTTP CAD and an EIDO WebSocket CAD that
acknowledge, fail, time out, refuse and recover; plus the spool and the desk driving them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ROOT, free_port
from handoff_support import incident, make_config

from adapters import base
from adapters.base import Ack, AdapterContext, AdapterUnavailable, Delivery, Refusal
from adapters.eido import SUBPROTOCOL
from adapters.spool import SpoolAdapter, SpoolOptions
from router.handoff.desk import open_desk
from router.handoff.incident import Incident, handoff_id

SECRET = "s3cret-for-tests"


def delivery(n: int = 1, **kw: Any) -> Delivery:
    inc = Incident.model_validate(incident(n, **kw)).contract_json()
    return Delivery(handoff_id(inc["from"], inc["incident_id"]), inc)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


# ---- a CAD that takes EIDO JSON over HTTP ---------------------------------------------------


class HttpCad:
    """Stores each incident once per Idempotency-Key, as a real CAD should; `mode` makes it
    misbehave: "down" (503), "slow" (answers after `slow_s`), "refuse" (422)."""

    def __init__(self, auth: str = "bearer"):
        self.auth = auth
        self.mode = "ok"
        self.slow_s = 1.0
        self.created: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/incidents"

    def _authorised(self, request: web.Request, body: bytes) -> bool:
        if self.auth == "bearer":
            return request.headers.get("Authorization") == f"Bearer {SECRET}"
        stamp = request.headers.get("X-Overflow-Timestamp", "")
        expected = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        return hmac.compare_digest(request.headers.get("X-Overflow-Signature", ""), expected)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if not self._authorised(request, body):
            return web.json_response({"message": "bad credentials"}, status=401)
        if self.mode == "down":
            return web.json_response({"message": "maintenance"}, status=503)
        if self.mode == "slow":  # the router gives up first; this request is abandoned
            await asyncio.sleep(self.slow_s)
            return web.json_response({"message": "too late"}, status=504)
        if self.mode == "refuse":
            return web.json_response({"message": "unknown incident type"}, status=422)
        self.in_flight += 1  # deliveries the router is still waiting on
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)  # a little work, so concurrency is visible
            key = request.headers["Idempotency-Key"]
            duplicate = key in self.created
            self.created.setdefault(key, json.loads(body))
            return web.json_response({"reference": f"CAD-{len(self.created)}",
                                      "duplicate": duplicate}, status=200 if duplicate else 201)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def http_cad(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpCad]:
    monkeypatch.setenv("CAD_SECRET", SECRET)
    cad = HttpCad()
    app = web.Application()
    app.router.add_post("/incidents", cad.handle)
    runner, cad.port = await serve(app)
    try:
        yield cad
    finally:
        await runner.cleanup()


def http_adapter(url: str, **options: Any) -> Any:
    return base.build("http_json", {"url": url, "auth": "bearer", "secret_env": "CAD_SECRET",
                                    "timeout_s": 0.3, **options},
                      AdapterContext("met", Path("/nonexistent")))


async def test_http_json_acknowledged_once_per_key(http_cad: HttpCad) -> None:
    adapter = http_adapter(http_cad.url)
    try:
        d = delivery(1)
        first = await adapter.deliver(d)
        again = await adapter.deliver(d)
    finally:
        await adapter.aclose()
    assert first == Ack(reference="CAD-1", duplicate=False)
    assert again == Ack(reference="CAD-1", duplicate=True)
    doc = http_cad.created[d.key]
    assert doc["incidentComponent"]["localIncidentIdentifier"] == "KENT-000001"
    assert doc["extension"]["overflowRouter"]["incident"] == dict(d.incident)
    assert {"$id", "lastUpdateTimestamp"} <= set(doc["locationComponent"][0])


async def test_http_json_hmac_signature_is_verified(http_cad: HttpCad,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    http_cad.auth = "hmac"
    adapter = http_adapter(http_cad.url, auth="hmac")
    try:
        assert isinstance(await adapter.deliver(delivery(1)), Ack)
        monkeypatch.setenv("CAD_SECRET", "rotated-wrongly")
        refused = await adapter.deliver(delivery(2))
    finally:
        await adapter.aclose()
    assert isinstance(refused, Refusal) and "401" in refused.reason


async def test_http_json_fails_times_out_refuses_and_recovers(http_cad: HttpCad) -> None:
    adapter = http_adapter(http_cad.url)
    try:
        http_cad.mode = "down"
        with pytest.raises(AdapterUnavailable, match="503"):
            await adapter.deliver(delivery(1))
        http_cad.mode = "slow"
        with pytest.raises(AdapterUnavailable):
            await adapter.deliver(delivery(1))
        http_cad.mode = "refuse"
        refused = await adapter.deliver(delivery(1))
        assert isinstance(refused, Refusal) and "unknown incident type" in refused.reason
        http_cad.mode = "ok"
        assert isinstance(await adapter.deliver(delivery(1)), Ack)
    finally:
        await adapter.aclose()
    assert len(http_cad.created) == 1


async def test_http_json_unreachable_is_unavailable() -> None:
    adapter = http_adapter(f"http://127.0.0.1:{free_port()}/incidents")
    try:
        with pytest.raises(AdapterUnavailable):
            await adapter.deliver(delivery(1))
    finally:
        await adapter.aclose()


async def test_desk_over_http_holds_then_delivers_each_incident_once(
        http_cad: HttpCad, tmp_path: Path) -> None:
    cads = {"met": {"adapter": "http_json", "options": {
        "url": http_cad.url, "auth": "bearer", "secret_env": "CAD_SECRET", "timeout_s": 0.3}}}
    config = make_config(tmp_path, cads=cads, max_concurrency=3)
    http_cad.mode = "down"
    async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True) as desk:
        ids = [(await desk.submit(Incident.model_validate(incident(n))))[0]["id"]
               for n in range(20)]
        await until(lambda: desk.get(ids[0]), lambda h: h["status"] == "held")
        http_cad.mode = "slow"  # now it times out: still held
        await asyncio.sleep(0.4)
        http_cad.mode = "ok"
        await until(lambda: desk.query(status="delivered", to="met", limit=100),
                    lambda hs: len(hs) == 20)
    assert set(http_cad.created) == set(ids)
    assert http_cad.max_in_flight <= 3
    assert http_cad.requests > 20  # there were failed attempts, yet each created once


async def until(fetch: Callable[[], Any], ok: Callable[[Any], bool], within_s: float = 8.0) -> Any:
    async with asyncio.timeout(within_s):
        while True:
            value = await fetch()
            if ok(value):
                return value
            await asyncio.sleep(0.02)


# ---- a CAD on the EIDO WebSocket conveyance -------------------------------------------------


class EidoCad:
    """The CAD end of NENA-STA-024: subscribes, then answers each event; `mode` may be
    "ok", "refuse" (400), "error" (500), "silent" (never answers) or "drop" (hangs up)."""

    def __init__(self, subscribe: bool = True):
        self.subscribe = subscribe
        self.mode = "ok"
        self.events: list[dict[str, Any]] = []
        self.connections = 0
        self.protocols: list[str | None] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/eido"

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=5)
        await ws.prepare(request)
        self.connections += 1
        self.protocols.append(ws.ws_protocol)
        if self.subscribe:
            await ws.send_json({"subscribe": {"requestId": "r1", "requestType": "subscribe",
                                              "requestSubType": "new"}})
            answer = await ws.receive_json(timeout=2)
            assert answer["subscribeResponse"]["statusCode"] == 200
        async for msg in ws:
            event = json.loads(msg.data).get("event")
            if event is None:
                continue
            self.events.append(event)
            if self.mode == "drop":
                await ws.close()
                break
            if self.mode == "silent":
                continue
            code = {"ok": 200, "refuse": 400, "error": 500}[self.mode]
            await ws.send_json({"eventResponse": {
                "transactionId": event["transactionId"], "statusCode": code,
                "statusText": "Bad Request: no such incident type" if code == 400 else "x"}})
        return ws


@pytest.fixture
async def eido_cad() -> AsyncIterator[EidoCad]:
    cad = EidoCad()
    app = web.Application()
    app.router.add_get("/eido", cad.handle)
    runner, cad.port = await serve(app)
    try:
        yield cad
    finally:
        await runner.cleanup()


def eido_adapter(url: str) -> Any:
    return base.build("eido", {"url": url, "connect_timeout_s": 1, "subscribe_timeout_s": 0.5},
                      AdapterContext("met", Path("/nonexistent")))


async def test_eido_event_is_acknowledged_by_transaction_id(eido_cad: EidoCad) -> None:
    adapter = eido_adapter(eido_cad.url)
    try:
        d1, d2 = delivery(1), delivery(2)
        assert isinstance(await adapter.deliver(d1), Ack)
        assert isinstance(await adapter.deliver(d2), Ack)
    finally:
        await adapter.aclose()
    assert eido_cad.connections == 1 and eido_cad.protocols == [SUBPROTOCOL]
    assert [e["transactionId"] for e in eido_cad.events] == [d1.key, d2.key]
    doc = eido_cad.events[0]["notification"][0]
    assert doc["incidentComponent"]["incidentCommonPriorityNumber"] == 1
    assert eido_cad.events[0]["subscriptionId"].startswith("sub-")


async def test_eido_refuses_fails_times_out_drops_and_recovers(eido_cad: EidoCad) -> None:
    adapter = eido_adapter(eido_cad.url)
    try:
        eido_cad.mode = "refuse"
        refused = await adapter.deliver(delivery(1))
        assert isinstance(refused, Refusal) and "no such incident type" in refused.reason
        eido_cad.mode = "error"
        with pytest.raises(AdapterUnavailable, match="500"):
            await adapter.deliver(delivery(1))
        eido_cad.mode = "silent"
        with pytest.raises(TimeoutError):  # the desk bounds each attempt like this
            async with asyncio.timeout(0.2):
                await adapter.deliver(delivery(1))
        eido_cad.mode = "drop"
        with pytest.raises(AdapterUnavailable, match="closed"):
            await adapter.deliver(delivery(1))
        eido_cad.mode = "ok"
        assert isinstance(await adapter.deliver(delivery(1)), Ack)  # on a new connection
    finally:
        await adapter.aclose()
    assert eido_cad.connections == 2


async def test_eido_peer_that_never_subscribes_or_is_gone() -> None:
    cad = EidoCad(subscribe=False)
    app = web.Application()
    app.router.add_get("/eido", cad.handle)
    runner, cad.port = await serve(app)
    adapter = eido_adapter(cad.url)
    try:
        with pytest.raises(AdapterUnavailable, match="cannot open"):
            await adapter.deliver(delivery(1))
    finally:
        await adapter.aclose()
        await runner.cleanup()
    gone = eido_adapter(cad.url)
    try:
        with pytest.raises(AdapterUnavailable):
            await gone.deliver(delivery(1))
    finally:
        await gone.aclose()


async def test_desk_over_eido_records_a_refusal_as_failed(eido_cad: EidoCad,
                                                          tmp_path: Path) -> None:
    eido_cad.mode = "refuse"
    config = make_config(tmp_path, cads={"met": {"adapter": "eido",
                                                 "options": {"url": eido_cad.url}}})
    async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True) as desk:
        handoff, _ = await desk.submit(Incident.model_validate(incident(1)))
        failed = await until(lambda: desk.get(handoff["id"]), lambda h: h["status"] == "failed")
    assert "400" in failed["reason"] and failed["attempts"] == 1


# ---- spool and option checking --------------------------------------------------------------


async def test_spool_writes_one_file_per_handoff(tmp_path: Path) -> None:
    adapter = SpoolAdapter(SpoolOptions(), AdapterContext("met", tmp_path))
    d = delivery(1)
    first = await adapter.deliver(d)
    again = await adapter.deliver(d)
    files = list((tmp_path / "outbox" / "met").iterdir())
    assert [f.name for f in files] == [f"{d.key}.json"]
    assert json.loads(files[0].read_text())["incident"] == dict(d.incident)
    assert isinstance(first, Ack) and isinstance(again, Ack) and again.duplicate


def test_options_are_checked_per_force() -> None:
    problems = base.check({
        "met": ("http_json", {"url": "https://cad.example/x", "auth": "hmac"}),
        "kent": ("eido", {"url": "http://not-a-websocket"}),
        "city": ("sim", {"latency_s": 0.01}),
        "essex": ("fax", {}),
    })
    assert len(problems) == 3
    assert problems[0].startswith("forces.met.cad:") and "secret_env" in problems[0]
    assert problems[1].startswith("forces.kent.cad:") and "url" in problems[1]
    assert problems[2].startswith("forces.essex.cad:") and "unknown adapter 'fax'" in problems[2]


def test_bundled_adapters_are_all_available() -> None:
    assert {"eido", "http_json", "mqtt", "spool", "sim"} <= set(base.available())
    for name in ("eido", "http_json", "mqtt", "spool", "sim"):
        assert issubclass(base.load(name).Options, base.AdapterOptions)



def test_config_validation_reports_adapter_options_with_line_numbers() -> None:
    from router.config import ConfigError, parse_config

    text = (ROOT / "config" / "forces.yaml").read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "cad: {adapter: sim}" in line)
    lines[first] = lines[first].replace(
        "{adapter: sim}", "{adapter: eido, options: {url: 'http://x', heartbeat_s: -1}}")
    with pytest.raises(ConfigError) as err:
        parse_config("\n".join(lines), "forces.yaml")
    issues = {(i.line, i.key) for i in err.value.issues}
    assert issues == {(first + 1, "forces.met.cad.options.url"),
                      (first + 1, "forces.met.cad.options.heartbeat_s")}
