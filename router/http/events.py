"""Live updates for dashboards: Server-Sent Events at `GET /v1/events`.

A browser's EventSource cannot send an Authorization header, and a bearer token in a URL ends
up in proxies' and browsers' histories. So the page first trades its token (in the header, as
everywhere) for a ticket at `POST /v1/events/ticket`: random, single use, valid for
TICKET_TTL_S, bound to the token's role and force. The ticket in the stream's URL is worthless
once used or a few seconds old. (A fetch() stream could carry the header instead, but gives up
EventSource's framing and error events for no gain in safety.)

One hub per app fans out to at most MAX_CLIENTS streams:
- `board`: the forces, the routing table, calls routed per minute and the handoff backlog
  (a partner gets only what is coming to it: router.http.forces.incoming_json), pushed within
  BOARD_MIN_S of a new snapshot (a declaration, a probe, telemetry) and at least every
  BOARD_EVERY_S, as calls in flight change without one;
- `handoff`: each step a handoff's sender is told of (a partner: its own force's only);
- `alert`: diversion alerts and the handoff desk's alerts (escalations, rejections).
A client that cannot keep up (its queue full) is dropped; its page reconnects. On shutdown
every stream is ended, so the service's shutdown timeout is never spent waiting on them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from router.engine.model import Snapshot
from router.http.auth import PRINCIPAL, Principal, require
from router.http.errors import fail, query_params
from router.http.forces import forces_json, incoming_json, routing_json
from router.http.state import RUNTIME, runtime
from router.infra import metrics
from router.infra.timefmt import iso
from router.runtime import Runtime

log = logging.getLogger(__name__)

MAX_CLIENTS = 32  # a control room's screens, a video wall and partners' pages
TICKET_TTL_S = 30.0
MAX_TICKETS = 256  # unredeemed; the oldest go first
QUEUE = 64  # events waiting for one client before it counts as too slow
BOARD_MIN_S = 0.2  # coalesce snapshots: at most five boards a second
BOARD_EVERY_S = 2.0  # and at least one every two seconds (calls in flight, the stale banner)
HEARTBEAT_S = 15.0
MINUTES_KEPT = 15  # calls routed per minute, by destination
RECENT_ALERTS = 50

_CLOSE = b""  # queued to end a stream


@dataclass(eq=False)
class Client:
    principal: Principal
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(QUEUE))

    @property
    def party(self) -> str | None:
        """The force a partner sees; None for viewers and managers, who see everything."""
        return self.principal.force if self.principal.role == "partner" else None


def frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def involves(message: dict[str, Any], force: str) -> bool:
    """Whether a handoff step or an alert concerns `force` (its sender, destination, origin or
    one of the partners told)."""
    return force in (message.get("from"), message.get("to"), message.get("origin")) or (
        force in (message.get("partners") or ()))


class Events:
    """Tickets, streams and what is pushed down them; `run` in a task (RouterApp does)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.clients: set[Client] = set()
        self.alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ALERTS)
        self._tickets: dict[str, tuple[Principal, float]] = {}
        self._dirty = asyncio.Event()
        self._minutes: collections.OrderedDict[int, collections.Counter[str]] = (
            collections.OrderedDict())
        self._routed: collections.Counter[str] = _routed_totals()
        self._last_alert: dict[str, Any] | None = None
        self.closing = False

    # -- tickets --------------------------------------------------------------------------------

    def issue(self, principal: Principal) -> str:
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        while len(self._tickets) >= MAX_TICKETS:
            del self._tickets[next(iter(self._tickets))]
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (principal, now + TICKET_TTL_S)
        return ticket

    def redeem(self, ticket: str) -> Principal | None:
        found = self._tickets.pop(ticket, None)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    # -- what happens ---------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self._dirty.set()

    def on_handoff(self, message: dict[str, Any]) -> None:
        self._send("handoff", message)

    def on_alert(self, alert: dict[str, Any]) -> None:
        alert = {**alert, "at": alert.get("at") or iso(time.time())}
        self.alerts.append(alert)
        self._send("alert", alert)

    def _send(self, event: str, message: dict[str, Any]) -> None:
        data = frame(event, message)
        for client in list(self.clients):
            if client.party is None or involves(message, client.party):
                self._put(client, data)

    def _put(self, client: Client, data: bytes) -> None:
        try:
            client.queue.put_nowait(data)
        except asyncio.QueueFull:  # too slow: end its stream, its page will reconnect
            log.warning("dashboard stream of %s fell behind; closing it", client.principal.name)
            self.clients.discard(client)
            with contextlib.suppress(asyncio.QueueEmpty):
                client.queue.get_nowait()
            client.queue.put_nowait(_CLOSE)

    async def on_shutdown(self, app: web.Application) -> None:
        self.close_all()

    def close_all(self) -> None:
        self.closing = True
        for client in list(self.clients):
            self.clients.discard(client)
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(_CLOSE)

    # -- the board ------------------------------------------------------------------------------

    def board(self) -> dict[str, Any]:
        """What a viewer's page shows, in one message."""
        desk = self.rt.desk
        return {**forces_json(self.rt), **routing_json(self.rt),
                "routed_per_minute": [{"minute": iso(minute * 60.0, "seconds"),
                                       "by_destination": dict(counts)}
                                      for minute, counts in self._minutes.items()],
                "backlog": desk.backlog() if desk is not None else {},
                "at": iso(time.time())}

    def push_board(self) -> None:
        self._count_routed()
        for alert in self._new_diversion_alerts():
            self.on_alert(alert)
        if not self.clients:
            return
        viewer: bytes | None = None
        partners: dict[str, bytes] = {}
        for client in list(self.clients):
            party = client.party
            if party is None:
                viewer = viewer or frame("board", self.board())
                self._put(client, viewer)
            else:
                if party not in partners:
                    partners[party] = frame("board", {**incoming_json(self.rt, party),
                                                      "at": iso(time.time())})
                self._put(client, partners[party])

    def _count_routed(self) -> None:
        totals = _routed_totals()
        minute = int(time.time() // 60)
        counts = self._minutes.setdefault(minute, collections.Counter())
        for dest, total in totals.items():
            counts[dest] += max(total - self._routed.get(dest, 0), 0)
        self._routed = totals
        while len(self._minutes) > MINUTES_KEPT:
            self._minutes.popitem(last=False)

    def _new_diversion_alerts(self) -> list[dict[str, Any]]:
        """Diversion alerts the publisher raised since the last look (it keeps the last 50,
        newest last, in a list it replaces on each)."""
        sent = self.rt.publisher.alerter.sent if self.rt.publisher is not None else []
        last = next((i for i in range(len(sent) - 1, -1, -1) if sent[i] is self._last_alert),
                    None)
        fresh = sent if last is None else sent[last + 1:]
        if sent:
            self._last_alert = sent[-1]  # held, so it stays the same object
        return list(fresh)

    async def run(self) -> None:
        """Push boards until cancelled: soon after a change, and at least every few seconds."""
        self._new_diversion_alerts()  # those from before the first page are in no stream
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BOARD_EVERY_S):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                self.push_board()
            except Exception:  # a view that cannot be built must not end live updates
                log.exception("building the dashboard board failed")
            await asyncio.sleep(BOARD_MIN_S)


def _routed_totals() -> collections.Counter[str]:
    """Calls routed so far by destination, from the Prometheus counter the desk keeps."""
    totals: collections.Counter[str] = collections.Counter()
    for family in metrics.CALLS_ROUTED.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels["destination"]] += int(sample.value)
    return totals


EVENTS = web.AppKey("events", Events)


@require("viewer", "partner")
async def post_ticket(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    ticket = request.app[EVENTS].issue(principal)
    return web.json_response({
        "ticket": ticket, "expires_in_s": TICKET_TTL_S, "role": principal.role,
        "force": principal.force, "operator": principal.operator}, status=201)


async def get_events(request: web.Request) -> web.StreamResponse:
    """The stream: a `hello` (who the page is, recent alerts), the board at once, then
    whatever happens. Authorised by its ticket alone, checked before anything is sent."""
    events = request.app[EVENTS]
    params = query_params(request)
    if not params.get("ticket"):
        fail(400, "invalid", "ticket: required (POST /v1/events/ticket gives one)", "ticket")
    principal = events.redeem(params["ticket"])
    if principal is None:  # the stream takes no token: a bad ticket is bad input, not a 401
        fail(403, "forbidden", "ticket: unknown, used or expired; POST /v1/events/ticket "
             "for another", "ticket")
    if events.closing:
        fail(503, "unavailable", "the service is stopping")
    if len(events.clients) >= MAX_CLIENTS:
        fail(503, "unavailable", f"{MAX_CLIENTS} live dashboards are open already; try later")
    client = Client(principal)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    events.clients.add(client)
    try:
        party = client.party
        recent = [a for a in events.alerts if party is None or involves(a, party)]
        await resp.write(frame("hello", {"role": principal.role, "force": principal.force,
                                         "operator": principal.operator, "alerts": recent,
                                         "retry_ms": 2000}))
        rt = runtime(request)
        await resp.write(frame("board", events.board() if party is None
                               else {**incoming_json(rt, party), "at": iso(time.time())}))
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    data = await client.queue.get()
            except TimeoutError:
                data = b": keep-alive\n\n"
            if data == _CLOSE:
                break
            await resp.write(data)
    except ConnectionResetError:
        pass  # the page went away
    finally:
        events.clients.discard(client)
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app[EVENTS] = Events(app[RUNTIME])
    app.router.add_post("/v1/events/ticket", post_ticket)
    app.router.add_get("/v1/events", get_events)
