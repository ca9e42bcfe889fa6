"""Probes against real servers on loopback: HTTP, SIP OPTIONS over UDP, TCP."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port

from router.watch.probes import FailureLog, Outcome, ProbeResult, probe_http, probe_sip, probe_tcp

TIMEOUT = 0.3


class HealthServer:
    """A real aiohttp health endpoint whose answer the test controls."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text="ok" if self.status == 200 else "sick")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


class SipResponder(asyncio.DatagramProtocol):
    """A real UDP SIP endpoint: answers OPTIONS (echoing Call-ID) until told to go quiet."""

    def __init__(self, status: str = "200 OK") -> None:
        self.status = status
        self.answering = True
        self.wrong_call_id = False
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector transport does not subclass DatagramTransport in 3.11, so no isinstance
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.requests += 1
        if not self.answering or self.transport is None:
            return
        lines = data.decode().split("\r\n")
        assert lines[0].startswith("OPTIONS sip:")
        keep = [ln for ln in lines[1:] if ln.split(":", 1)[0] in ("Via", "From", "To", "CSeq")]
        call_id = "someone-else" if self.wrong_call_id else next(
            ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Call-ID:"))
        reply = "\r\n".join([f"SIP/2.0 {self.status}", *keep, f"Call-ID: {call_id}",
                             "Content-Length: 0", "", ""])
        self.transport.sendto(reply.encode(), addr)


async def serving_health() -> AsyncIterator[HealthServer]:
    """A started HealthServer, stopped afterwards; a fixture body other test files reuse."""
    server = HealthServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


http_server = pytest.fixture(serving_health, name="http_server")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def start_sip(status: str = "200 OK") -> tuple[SipResponder, str]:
    port = free_port(socket.SOCK_DGRAM)
    _, responder = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: SipResponder(status), local_addr=("127.0.0.1", port))
    return responder, f"127.0.0.1:{port}"


async def test_http_ok_then_503_then_slow_then_stopped(
        http_server: HealthServer, session: aiohttp.ClientSession) -> None:
    ok = await probe_http(session, http_server.url, TIMEOUT)
    assert ok.ok and ok.detail == "HTTP 200" and 0 < ok.latency_s < TIMEOUT
    http_server.status = 503
    sick = await probe_http(session, http_server.url, TIMEOUT)
    assert sick.outcome is Outcome.BAD_ANSWER and sick.detail == "HTTP 503"
    http_server.status, http_server.delay = 200, TIMEOUT * 3
    slow = await probe_http(session, http_server.url, TIMEOUT)
    assert slow.outcome is Outcome.TIMEOUT and slow.latency_s < TIMEOUT * 2
    await http_server.stop()
    gone = await probe_http(session, http_server.url, TIMEOUT)
    assert gone.outcome is Outcome.REFUSED


async def test_sip_options_any_response_means_alive_until_quiet() -> None:
    responder, target = await start_sip("503 Service Unavailable")
    try:
        alive = await probe_sip(target, TIMEOUT)
        assert alive.ok and alive.detail == "SIP/2.0 503 Service Unavailable"
        responder.wrong_call_id = True  # a stray response is not an answer to us
        stray = await probe_sip(target, TIMEOUT)
        assert stray.outcome is Outcome.TIMEOUT
        responder.wrong_call_id, responder.answering = False, False
        quiet = await probe_sip(target, TIMEOUT)
        assert quiet.outcome is Outcome.TIMEOUT and responder.requests == 3
    finally:
        assert responder.transport is not None
        responder.transport.close()


async def test_sip_to_a_closed_port_is_refused_not_a_timeout() -> None:
    port = free_port(socket.SOCK_DGRAM)  # nothing bound: loopback answers ICMP unreachable
    result = await probe_sip(f"127.0.0.1:{port}", TIMEOUT)
    assert result.outcome is Outcome.REFUSED and result.latency_s < TIMEOUT


async def test_tcp_connect_and_refusal() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await probe_tcp(f"127.0.0.1:{port}", TIMEOUT)).ok
    finally:
        server.close()
        await server.wait_closed()
    assert (await probe_tcp(f"127.0.0.1:{port}", TIMEOUT)).outcome is Outcome.REFUSED


def test_failures_are_logged_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    flog = FailureLog("met sip 127.0.0.1:5060")
    caplog.set_level(logging.INFO, logger="router.watch.probes")
    ok = ProbeResult(Outcome.OK, 0.001, "SIP/2.0 200 OK")
    timeout = ProbeResult(Outcome.TIMEOUT, 0.2, "no answer")
    refused = ProbeResult(Outcome.REFUSED, 0.001, "port unreachable")
    for result in [ok, timeout, timeout, timeout, refused, refused, ok, ok]:
        flog.record(result)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "failing: timeout" in messages[0] and "failing: refused" in messages[1]
    assert "recovered" in messages[2]
