"""Active checks of a centre: HTTP GET, SIP OPTIONS over UDP, TCP connect. Each has a timeout.

A probe never raises: it returns a `ProbeResult` whose `outcome` separates timeouts, refusals,
bad answers and other errors, because an operator reads them differently (a timeout is a
network or an overloaded host; a refusal is a process that is not listening).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from router.config import Probe

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    BAD_ANSWER = "bad_answer"  # an answer, but not a healthy one (HTTP 5xx, not SIP)
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: Outcome
    latency_s: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


def _timeout(start: float, timeout_s: float) -> ProbeResult:
    return ProbeResult(Outcome.TIMEOUT, time.perf_counter() - start, f"no answer in {timeout_s}s")


async def probe_http(session: aiohttp.ClientSession, url: str, timeout_s: float) -> ProbeResult:
    """Alive = a 2xx answer."""
    start = time.perf_counter()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                               allow_redirects=False) as response:
            await response.read()
            outcome = Outcome.OK if 200 <= response.status < 300 else Outcome.BAD_ANSWER
            return ProbeResult(outcome, time.perf_counter() - start, f"HTTP {response.status}")
    except TimeoutError:
        return _timeout(start, timeout_s)
    except aiohttp.ClientConnectorError as exc:
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return ProbeResult(Outcome.REFUSED if refused else Outcome.ERROR,
                           time.perf_counter() - start, str(exc.os_error or exc))
    except aiohttp.ClientError as exc:
        return ProbeResult(Outcome.ERROR, time.perf_counter() - start,
                           f"{type(exc).__name__}: {exc}")


async def probe_tcp(target: str, timeout_s: float) -> ProbeResult:
    """Alive = the port accepts a connection."""
    host, port = _split(target)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return _timeout(start, timeout_s)
    except ConnectionRefusedError:
        return ProbeResult(Outcome.REFUSED, time.perf_counter() - start, "connection refused")
    except OSError as exc:
        return ProbeResult(Outcome.ERROR, time.perf_counter() - start, str(exc))
    latency = time.perf_counter() - start
    writer.close()
    try:
        async with asyncio.timeout(timeout_s):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass  # the check already succeeded; closing is housekeeping
    return ProbeResult(Outcome.OK, latency, "connected")


def sip_options(host: str, port: int, local_port: int, branch: str, call_id: str) -> bytes:
    """A minimal RFC 3261 OPTIONS request (Kamailio's dispatcher pings the same way)."""
    uri = f"sip:{host}:{port}"
    return (
        f"OPTIONS {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK{branch};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:overflow-router@127.0.0.1>;tag={branch[:10]}\r\n"
        f"To: <{uri}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Accept: application/sdp\r\n"
        f"User-Agent: overflow-router\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


class _SipClient(asyncio.DatagramProtocol):
    """Resolves `answer` with the status line of the first SIP response carrying our Call-ID."""

    def __init__(self, call_id: str):
        self.call_id = call_id.encode()
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.answer.done() or not data.startswith(b"SIP/2.0 ") or self.call_id not in data:
            return  # not a response to this request: keep waiting
        self.answer.set_result(data.split(b"\r\n", 1)[0].decode(errors="replace"))

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("socket closed"))


async def probe_sip(target: str, timeout_s: float) -> ProbeResult:
    """Alive = any SIP response to OPTIONS (even 4xx/5xx: the stack is up and answering)."""
    host, port = _split(target)
    loop = asyncio.get_running_loop()
    call_id = secrets.token_hex(8)
    start = time.perf_counter()
    transport: asyncio.DatagramTransport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _SipClient(call_id), remote_addr=(host, port))
            local_port = transport.get_extra_info("sockname")[1]
            transport.sendto(sip_options(host, port, local_port, secrets.token_hex(8), call_id))
            status = await protocol.answer
        return ProbeResult(Outcome.OK, time.perf_counter() - start, status)
    except TimeoutError:
        return _timeout(start, timeout_s)
    except ConnectionRefusedError:  # ICMP port unreachable on a connected UDP socket
        return ProbeResult(Outcome.REFUSED, time.perf_counter() - start, "port unreachable")
    except OSError as exc:
        return ProbeResult(Outcome.ERROR, time.perf_counter() - start, str(exc))
    finally:
        if transport is not None:
            transport.close()


async def run_probe(probe: Probe, timeout_s: float,
                    session: aiohttp.ClientSession) -> ProbeResult:
    if probe.kind == "http":
        return await probe_http(session, probe.target, timeout_s)
    if probe.kind == "sip":
        return await probe_sip(probe.target, timeout_s)
    return await probe_tcp(probe.target, timeout_s)


class FailureLog:
    """Logs a probe's failure once, on the turn from healthy to failing, and "recovered" once on
    the way back (Home Assistant's DataUpdateCoordinator): never a line per failed poll. A change
    of failure kind (timeout → refused) is logged too, since it changes the diagnosis."""

    def __init__(self, name: str):
        self.name = name
        self._failing: Outcome | None = None

    def record(self, result: ProbeResult) -> None:
        if result.ok:
            if self._failing is not None:
                log.info("%s: recovered (%s)", self.name, result.detail)
            self._failing = None
        elif result.outcome is not self._failing:
            log.warning("%s: failing: %s (%s)", self.name, result.outcome.value, result.detail)
            self._failing = result.outcome
