"""HTTP handlers for incident handoffs: parse, call the desk, serialise.

A partner's token speaks for one force: it may hand over incidents `from` that force only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.handoff.desk import HandoffDesk
from router.handoff.incident import Incident, Status, UnknownDestination
from router.http.auth import PRINCIPAL, Principal, require
from router.http.errors import fail, read_json, validate


class DeskHolder(Protocol):
    """Where the handlers find the desk. The service's desk opens during start-up, once the
    app is frozen, so the app holds the Runtime (whose `desk` is set then), not the desk."""

    @property
    def desk(self) -> HandoffDesk | None: ...


@dataclass(frozen=True, slots=True)
class OpenDesk:
    """A desk opened before the app starts (tests, benchmarks)."""

    desk: HandoffDesk


HANDOFFS = web.AppKey[DeskHolder]("handoffs")


class HandoffQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    status: Status | None = None
    to: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


def _desk(request: web.Request) -> HandoffDesk:
    desk = request.app[HANDOFFS].desk
    if desk is None:
        fail(503, "unavailable", "the handoff desk is starting")
    return desk


@require("partner")
async def post_handoff(request: web.Request) -> web.Response:
    incident = await read_json(request, Incident)
    principal: Principal = request[PRINCIPAL]
    if incident.from_ != principal.force:
        fail(403, "forbidden", f"from: partner:{principal.force} may only hand over its own "
             f"incidents, not {incident.from_!r}'s", "from")
    desk = _desk(request)
    try:
        handoff, created = await desk.submit(incident)
    except UnknownDestination as exc:
        fail(400, "unknown_force", str(exc), "to")
    return web.json_response(handoff, status=202 if created else 200,
                             headers={"Location": f"/v1/handoffs/{handoff['id']}"})


@require("viewer")
async def get_handoff(request: web.Request) -> web.Response:
    found = await _desk(request).get(request.match_info["id"])
    if found is None:
        fail(404, "not_found", f"no handoff {request.match_info['id']!r}")
    return web.json_response(found)


@require("viewer")
async def list_handoffs(request: web.Request) -> web.Response:
    query = validate(HandoffQuery, dict(request.query))
    handoffs = await _desk(request).query(status=query.status, to=query.to, limit=query.limit)
    return web.json_response({"handoffs": handoffs, "count": len(handoffs)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/handoffs", post_handoff)
    app.router.add_get("/v1/handoffs", list_handoffs)
    app.router.add_get("/v1/handoffs/{id}", get_handoff)
