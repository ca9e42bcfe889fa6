"""Hostile and unlucky HTTP input, over a real loopback socket: bodies in pieces, deep JSON,
control characters in identifiers, repeated parameters, unparseable requests, slow clients,
partners reading their own handoffs, and a service started without its tokens.

Nothing a caller sends may produce a 500, echo its input in an error, or log an ERROR."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from handoff_support import inc, incident
from service_support import TOKENS, Running, environ, make_config, running_service

from router.config import load_config
from router.http import errors
from router.http.app import RouterApp
from router.http.errors import MAX_BODY_BYTES
from router.http.server import MAX_REQUEST_LINE

ROUTE = {"call_id": "c-1", "service": "999", "origin": "met"}
TELEPHONY = b"Authorization: Bearer t-telephony-secret\r\n"
KENT = b"Authorization: Bearer t-kent-secret\r\n"
READ_S = 10.0  # a bound on waiting for the server, never a timing assertion


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_service(make_config(tmp_path)) as running:
        yield running


def port_of(api: Running) -> int:
    return int(api.base.rsplit(":", 1)[1])


def tracebacks_or_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


@contextlib.asynccontextmanager
async def connection(api: Running) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port_of(api)), READ_S)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), READ_S)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))),
                                  READ_S)
    return status, headers, body


async def exchange(api: Running, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    async with connection(api) as (reader, writer):
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed; False if it sent something instead."""
    try:
        data = await asyncio.wait_for(reader.read(1), READ_S)
    except ConnectionResetError:
        return True
    return data == b""


def post(path: str, body: bytes, auth: bytes = TELEPHONY, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n").encode() + \
        auth + b"\r\n"


# ---- 1: a body in several segments --------------------------------------------------------


@pytest.mark.parametrize(("path", "auth", "body", "expected"), [
    ("/v1/route", TELEPHONY, ROUTE, 200),
    ("/v1/handoffs", KENT, incident(1), 202),
])
async def test_a_body_in_two_segments_is_read_whole(
        api: Running, path: str, auth: bytes, body: dict[str, Any], expected: int) -> None:
    raw = json.dumps(body).encode()
    async with connection(api) as (reader, writer):
        writer.write(post(path, raw, auth) + raw[:len(raw) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)  # the first half is surely read alone
        writer.write(raw[len(raw) // 2:])
        await writer.drain()
        status, _, answer = await read_response(reader)
    assert status == expected, answer


async def test_bodies_over_the_limit_are_413_declared_or_not(api: Running) -> None:
    status, _, answer = await exchange(api, post("/v1/route", b"", length=MAX_BODY_BYTES + 1))
    assert status == 413 and json.loads(answer)["error"] == "too_large"
    chunk = b"x" * 8192  # chunked: no Content-Length to refuse up front
    raw = (b"POST /v1/route HTTP/1.1\r\nHost: router\r\nTransfer-Encoding: chunked\r\n" +
           TELEPHONY + b"\r\n" + b"".join(b"2000\r\n" + chunk + b"\r\n" for _ in range(9)) +
           b"0\r\n\r\n")
    status, _, answer = await exchange(api, raw)
    assert status == 413 and json.loads(answer)["error"] == "too_large"


async def test_a_body_that_never_ends_is_408(api: Running,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "BODY_TIMEOUT_S", 0.3)
    status, headers, answer = await exchange(api, post("/v1/route", b"", length=100) + b'{"ca')
    assert status == 408 and json.loads(answer)["error"] == "timeout"
    assert headers.get("connection") == "close"


# ---- 2: deep JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"[" * 20_000,
    json.dumps({**ROUTE, "caller": "@"}).encode().replace(b'"@"', b"[" * 20_000 + b"]" * 20_000),
])
async def test_deeply_nested_json_is_a_400(api: Running, body: bytes,
                                           caplog: pytest.LogCaptureFixture) -> None:
    assert len(body) < MAX_BODY_BYTES
    status, err = await api.call("POST", "/v1/route", "telephony", data=body,
                                 headers={"Content-Type": "application/json"})
    assert status == 400 and err["error"] == "malformed_json"
    assert "too deeply" in err["message"]
    assert tracebacks_or_errors(caplog) == []


# ---- 3: 405 keeps Allow -----------------------------------------------------------------------


async def test_405_says_what_is_allowed(api: Running) -> None:
    async with api.session.delete(api.base + "/v1/route") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
        assert (await resp.json())["error"] == "method_not_allowed"


# ---- 4: identifiers are visible characters ------------------------------------------------


@pytest.mark.parametrize("call_id", ["a\x00b", "a\nb", "a b", "a\tb", "x" * 257, "\u202eab"])
async def test_call_ids_with_controls_or_spaces_are_refused_everywhere(
        api: Running, call_id: str) -> None:
    status, err = await api.call("POST", "/v1/route", "telephony", json={**ROUTE,
                                                                         "call_id": call_id})
    assert (status, err["field"]) == (400, "call_id"), err
    status, err = await api.call("GET", "/v1/route", "telephony",
                                 params={**ROUTE, "call_id": call_id})
    assert (status, err["field"]) == (400, "call_id"), err
    status, err = await api.call("POST", f"/v1/calls/{quote(call_id, safe='')}/end",
                                 "telephony")
    assert (status, err["field"]) == (400, "call_id"), err


async def test_a_sip_call_id_is_still_accepted(api: Running) -> None:
    call_id = "a84b4c76e66710@pc33.atlanta.example.com"
    status, decision = await api.call("POST", "/v1/route", "telephony",
                                      json={**ROUTE, "call_id": call_id})
    assert status == 200 and decision["call_id"] == call_id
    status, _ = await api.call("POST", f"/v1/calls/{call_id}/end", "telephony")
    assert status == 204


async def test_other_free_text_from_http_refuses_controls(api: Running) -> None:
    status, err = await api.call("POST", "/v1/route", "telephony",
                                 json={**ROUTE, "caller": "+44 7700\n900123"})
    assert (status, err["field"]) == (400, "caller")
    status, err = await api.call("PUT", "/v1/forces/met/override", "manager",
                                 json={"state": "down", "reason": "fire\r\nforged: line"})
    assert (status, err["field"]) == (400, "reason")
    status, err = await api.call("GET", "/v1/handoffs", "viewer", params={"to": "met\x00"})
    assert (status, err["field"]) == (400, "to")
    status, err = await api.call("GET", "/v1/handoffs/abc%00def", "viewer")
    assert status == 404 and "\x00" not in err["message"]


# ---- 5: a parameter given twice -------------------------------------------------------------


@pytest.mark.parametrize(("path", "role", "query", "field"), [
    ("/v1/route", "telephony", "call_id=c-9&service=999&service=101&origin=met", "service"),
    ("/v1/route", "telephony", "call_id=c-9&service=999&origin=met&format=json&format=text",
     "format"),
    ("/v1/handoffs", "viewer", "status=held&status=delivered", "status"),
    ("/v1/handoffs", "viewer", "limit=1&limit=1000", "limit"),
])
async def test_a_repeated_query_parameter_is_refused(api: Running, path: str, role: str,
                                                     query: str, field: str) -> None:
    status, err = await api.call("GET", f"{path}?{query}", role)
    assert (status, err["error"], err["field"]) == (400, "invalid", field)


# ---- 6, 7: requests aiohttp cannot parse --------------------------------------------------


MARK = "ECHO-ME"


@pytest.mark.parametrize(("raw", "status", "code"), [
    (f"GET /v1/route?call_id={MARK}{'x' * MAX_REQUEST_LINE} HTTP/1.1\r\nHost: r\r\n\r\n",
     414, "uri_too_long"),
    (f"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Big: {MARK}{'y' * 10_000}\r\n\r\n",
     431, "headers_too_large"),
    ("GET /healthz HTTP/1.1\r\nHost: r\r\n" + "".join(f"X-{i}: {MARK}\r\n" for i in range(200))
     + "\r\n", 431, "headers_too_large"),
    (f"GET /{MARK} HTTP/1.1 extra\r\nHost: r\r\n\r\n", 400, "bad_request"),
    (f"G\x00T /{MARK} HTTP/1.1\r\nHost: r\r\n\r\n", 400, "bad_request"),
    (f"\x16\x03\x01{MARK}\r\n\r\n", 400, "bad_request"),  # TLS to the plain port
])
async def test_unparseable_requests_get_contract_json_without_echo(
        api: Running, caplog: pytest.LogCaptureFixture, raw: str, status: int,
        code: str) -> None:
    caplog.set_level(logging.DEBUG)
    got, headers, body = await exchange(api, raw.encode("latin-1"))
    assert got == status
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)
    assert err["error"] == code and err["message"]
    assert MARK.encode() not in body
    assert tracebacks_or_errors(caplog) == []
    ours = [r for r in caplog.records if r.name.startswith(("aiohttp", "router"))]
    assert len(ours) <= 1 and all(len(r.getMessage()) < 200 for r in ours)


async def test_broken_bodies_and_credentials_are_quiet_4xx(
        api: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, _ = await exchange(api, b"POST /v1/route HTTP/1.1\r\nHost: r\r\n" + TELEPHONY +
                                  b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello")
    assert status == 400
    status, _, _ = await exchange(api, b"GET /v1/forces HTTP/1.1\r\nHost: r\r\n"
                                       b"Authorization: Bearer \xff\xfe\r\n\r\n")
    assert status == 401
    async with connection(api) as (_, writer):  # a body cut short by a client that leaves
        writer.write(post("/v1/route", b"", length=100) + b'{"call_id"')
        await writer.drain()
    status, _ = await api.call("GET", "/healthz")  # and the service carries on
    assert status == 200
    await asyncio.sleep(0.2)  # let the server see the departed client
    assert tracebacks_or_errors(caplog) == []


async def test_an_unknown_expectation_is_contract_json(api: Running) -> None:
    raw = post("/v1/route", b"{}").replace(b"\r\n\r\n", f"\r\nExpect: {MARK}\r\n\r\n".encode())
    status, headers, body = await exchange(api, raw + b"{}")
    assert status == 417 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "expectation_failed" and MARK.encode() not in body


# ---- 8: slow clients -------------------------------------------------------------------------


@pytest.fixture
async def impatient(tmp_path: Path) -> AsyncIterator[Running]:
    config = make_config(tmp_path, listen={"host": "127.0.0.1", "port": 0,
                                           "header_timeout_s": 0.5})
    async with running_service(config) as running:
        yield running


async def test_a_client_dribbling_its_headers_is_disconnected(impatient: Running) -> None:
    async with connection(impatient) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: r\r\n")
        closed = False
        for _ in range(100):  # one header byte per 0.1 s, for at most 10 s
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            with contextlib.suppress(asyncio.TimeoutError):
                data = await asyncio.wait_for(reader.read(1), 0.1)
                assert data == b"", data  # no response to half a request
                closed = True
                break
        assert closed


async def test_an_idle_keep_alive_connection_is_closed(impatient: Running) -> None:
    async with connection(impatient) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n")
        await writer.drain()
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers.get("connection") != "close"
        assert await closed_by_server(reader)


# ---- 9: partners read their own handoffs ------------------------------------------------------


async def test_a_partner_reads_the_handoffs_it_is_party_to_and_no_others(api: Running) -> None:
    async with api.session.post(api.base + "/v1/handoffs", json=incident(1),
                                headers=api.auth("partner:kent")) as resp:
        assert resp.status == 202
        location = resp.headers["Location"]
    desk = api.service.runtime.desk
    assert desk is not None
    to_kent, _ = await desk.submit(inc(2, frm="essex", to="kent"))
    others, _ = await desk.submit(inc(3, frm="essex", to="met"))

    status, mine = await api.call("GET", location, "partner:kent")
    assert status == 200 and mine["from"] == "kent"
    status, _ = await api.call("GET", f"/v1/handoffs/{to_kent['id']}", "partner:kent")
    assert status == 200
    status, err = await api.call("GET", f"/v1/handoffs/{others['id']}", "partner:kent")
    assert (status, err["error"]) == (404, "not_found")  # as if it did not exist

    status, listing = await api.call("GET", "/v1/handoffs", "partner:kent")
    assert status == 200
    assert {h["id"] for h in listing["handoffs"]} == {mine["id"], to_kent["id"]}
    status, listing = await api.call("GET", "/v1/handoffs?to=met&limit=5", "partner:kent")
    assert [h["id"] for h in listing["handoffs"]] == [mine["id"]]
    status, everything = await api.call("GET", "/v1/handoffs", "viewer")
    assert everything["count"] == 3
    status, _ = await api.call("GET", f"/v1/handoffs/{others['id']}", "manager")
    assert status == 200
    status, _ = await api.call("GET", "/v1/handoffs", "telephony")
    assert status == 403


# ---- 10: tokens the config names but the environment lacks -----------------------------------


@contextlib.asynccontextmanager
async def started_with(config_path: Path, env: dict[str, str]) -> AsyncIterator[str]:
    service = RouterApp(load_config(config_path), config_path, env)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.run("127.0.0.1", 0, stop, ready.set_result))
    try:
        yield f"http://127.0.0.1:{await asyncio.wait_for(ready, READ_S)}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.mark.parametrize("unset", ["some", "all"])
async def test_unset_token_variables_are_reported_and_the_service_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, unset: str) -> None:
    env = environ()
    gone = ["TEST_TOKEN_1", "TEST_TOKEN_3"] if unset == "some" else list(env)
    for name in gone:
        del env[name]
    caplog.set_level(logging.INFO, logger="router")
    async with started_with(make_config(tmp_path), env) as base, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_S)) as session:
        for path in ("/healthz", "/metrics"):
            async with session.get(base + path) as resp:
                assert resp.status == 200
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name == "router.http.auth"]
    roles = dict(zip(environ(), TOKENS, strict=True))
    assert len(warned) == len(gone)
    assert all(name in line and f"role {roles[name]})" in line
               for name, line in zip(gone, warned, strict=True))
    errors_logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors_logged) == (1 if unset == "all" else 0)
    assert all(r.exc_info is None for r in errors_logged)
