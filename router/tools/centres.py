"""Simulated force centres for the demo: a control room as a queue of calls and handlers,
whose phones answer SIP OPTIONS over UDP while they are up, and which reports itself as an
ACD's telemetry would."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass, field
from typing import Any, cast


class SipOptionsResponder(asyncio.DatagramProtocol):
    """Answers SIP OPTIONS with 200 OK while its centre's telephony is up."""

    def __init__(self, centre: SimCentre):
        self.centre = centre
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.centre.telephony_up or self.transport is None:
            return
        lines = data.decode(errors="replace").split("\r\n")
        keep = [ln for ln in lines[1:] if ln.split(":", 1)[0].strip().lower()
                in ("via", "v", "from", "f", "to", "t", "call-id", "i", "cseq")]
        reply = "\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0", "", ""])
        self.transport.sendto(reply.encode(), addr)


@dataclass
class SimCentre:
    """A control room as a queue: handlers answer calls in order of arrival."""

    force: str
    handlers: int
    telephony_up: bool = True
    cad_up: bool = True
    sip_port: int = 0
    mean_handling_s: float = 20.0
    busy: list[tuple[float, str]] = field(default_factory=list)  # (ends_at, call_id)
    waiting: collections.deque[tuple[float, str]] = field(default_factory=collections.deque)

    def take(self, call_id: str, now: float) -> None:
        self.waiting.append((now, call_id))

    def tick(self, now: float, rng: random.Random) -> list[str]:
        """Advance the queue; returns the calls that ended."""
        done = [cid for ends, cid in self.busy if ends <= now]
        self.busy = [(ends, cid) for ends, cid in self.busy if ends > now]
        while self.waiting and len(self.busy) < self.handlers:
            _, cid = self.waiting.popleft()
            self.busy.append((now + rng.expovariate(1 / self.mean_handling_s), cid))
        return done

    def telemetry(self, now: float) -> dict[str, Any]:
        return {
            "ts": time.time(), "telephony_up": self.telephony_up, "cad_up": self.cad_up,
            "calls_waiting": len(self.waiting),
            "handlers_available": max(self.handlers - len(self.busy), 0),
            "handlers_on_duty": self.handlers,
            # max: a call may join the queue after `now` was read, while telemetry is sent
            "oldest_wait_s": max(round(now - self.waiting[0][0], 1), 0.0) if self.waiting
            else 0.0,
        }
