"""HTTP handlers for incident handoffs: parse, call the desk, serialise.

A partner's token speaks for one force: it may hand over incidents `from` that force only,
and read the handoffs from or to that force only; any other is "not found" to it, so ids of
other forces' handoffs do not leak. Viewers and managers read them all. A partner whose token
names a signing key must sign each handoff (router.http.signing). The destination's partner
token answers for what was sent to it (`acknowledgement`, `completion`), nobody else.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from adapters.base import Answer, AnswerRefused
from router.config import FORCE_ID
from router.handoff.desk import HandoffDesk
from router.handoff.incident import HandoffConflict, Incident, Status, UnknownDestination
from router.handoff.sheets import Sheet, render_html
from router.handoff.store import StoreError
from router.http.auth import PRINCIPAL, Principal, require
from router.http.errors import (
    OneLine,
    fail,
    parse_body,
    query_params,
    read_body,
    read_json,
    validate,
)
from router.http.signing import SignatureError, verify


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
HANDOFF_ID = re.compile(r"[0-9a-f]{32}")  # as handoff_id() makes them
MAX_LIMIT = 1000  # handoffs in one listing
RETRY_AFTER = {"Retry-After": "2"}  # seconds: the desk reopens its store within a few


class HandoffQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    status: Status | None = None
    to: Annotated[str, Field(pattern=FORCE_ID)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 100


def _desk(request: web.Request) -> HandoffDesk:
    desk = request.app[HANDOFFS].desk
    if desk is None:
        fail(503, "unavailable", "the handoff desk is starting, or its store is unavailable "
             "and being reopened; try again", headers=RETRY_AFTER)
    return desk


@require("partner")
async def post_handoff(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    raw = await read_body(request)
    if principal.signing_key is not None:  # over the exact bytes, before anything reads them
        try:
            verify(principal.signing_key, request.headers, raw, now=time.time())
        except SignatureError as exc:
            fail(401, exc.code, exc.message)
    incident = parse_body(raw, Incident)
    if incident.from_ != principal.force:
        fail(403, "forbidden", f"from: partner:{principal.force} may only hand over its own "
             f"incidents, not {incident.from_!r}'s", "from")
    desk = _desk(request)
    try:
        handoff, created = await desk.submit(incident)
    except UnknownDestination as exc:
        fail(400, "unknown_force", str(exc), "to")
    except HandoffConflict as exc:
        fail(409, "conflict", str(exc), exc.fields[0])
    except StoreError:  # logged by the store; the partner may retry
        fail(503, "unavailable", "the handoff could not be stored; try again",
             headers=RETRY_AFTER)
    return web.json_response(handoff, status=202 if created else 200,
                             headers={"Location": f"/v1/handoffs/{handoff['id']}"})


class AcknowledgementRequest(BaseModel):
    """A dispatcher at the destination accepts the handoff, or rejects it and says why."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: Literal["accepted", "rejected"]
    by: Annotated[OneLine, Field(min_length=1, max_length=200)]
    at: AwareDatetime | None = None  # when the dispatcher answered; default: on receipt
    # required with `rejected`
    cause: Annotated[OneLine, Field(min_length=1, max_length=500)] | None = None
    reference: Annotated[OneLine, Field(min_length=1, max_length=128)] | None = None


class CompletionRequest(BaseModel):
    """The incident is closed at the destination: completed, or aborted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: Literal["completed", "aborted"]
    at: AwareDatetime | None = None
    by: Annotated[OneLine, Field(min_length=1, max_length=200)] | None = None
    note: Annotated[OneLine, Field(min_length=1, max_length=2000)] | None = None


REFUSED = {"not_found": 404, "forbidden": 403, "not_delivered": 409, "conflict": 409,
           "invalid": 400, "unavailable": 503}


async def _answer(request: web.Request, answer: Answer) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    try:
        handoff = await _desk(request).answer(answer, str(principal.force))
    except AnswerRefused as exc:  # naming the handoff, not the token, as what is wrong
        fail(REFUSED.get(exc.code, 400), exc.code, str(exc),
             "id" if exc.code in ("forbidden", "not_found") else None)
    except StoreError:
        fail(503, "unavailable", "the answer could not be stored; try again",
             headers=RETRY_AFTER)
    return web.json_response(handoff)


def _answered_id(request: web.Request) -> str:
    hid = request.match_info["id"]
    if HANDOFF_ID.fullmatch(hid) is None:
        fail(404, "not_found", "no handoff has that id")
    return hid


@require("partner")
async def post_acknowledgement(request: web.Request) -> web.Response:
    hid = _answered_id(request)
    body = await read_json(request, AcknowledgementRequest)
    if body.outcome == "rejected" and body.cause is None:
        fail(400, "invalid", "cause: a rejection must say why", "cause")
    return await _answer(request, Answer(
        hid, "acknowledgement", body.outcome, body.at.timestamp() if body.at else None,
        body.by, body.cause or "", "", body.reference or ""))


@require("partner")
async def post_completion(request: web.Request) -> web.Response:
    hid = _answered_id(request)
    body = await read_json(request, CompletionRequest)
    return await _answer(request, Answer(
        hid, "completion", body.outcome, body.at.timestamp() if body.at else None,
        body.by or "", "", body.note or ""))


class PaperRequest(BaseModel):
    """A manager's word that the control room handles the handoff on paper."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: Annotated[OneLine, Field(min_length=1, max_length=500)]
    # who: required unless the token names its operator
    operator: Annotated[OneLine, Field(min_length=1, max_length=100)] | None = None


@require("manager")
async def post_paper(request: web.Request) -> web.Response:
    """Handled on paper: final, so no more delivery attempts or escalations; the sender is
    told and the audit chain records who and why (router.http.telling)."""
    hid = _answered_id(request)
    body = await read_json(request, PaperRequest)
    who = body.operator or request[PRINCIPAL].operator
    if who is None:
        fail(400, "invalid", "operator: required: say who is handling it (this token names "
             "no operator)", "operator")
    try:
        handoff = await _desk(request).on_paper(hid, who, body.reason)
    except AnswerRefused as exc:
        fail(409, exc.code, str(exc))
    except StoreError:
        fail(503, "unavailable", "it could not be recorded; try again")
    if handoff is None:
        fail(404, "not_found", f"no handoff {hid}")
    return web.json_response(handoff)


@require("viewer")
async def get_sheet(request: web.Request) -> web.Response:
    """The handoff's printable sheet, as the escalation writes into the spool folder, made
    afresh from the store (so it is there even where the spool folder is not readable)."""
    hid = _answered_id(request)
    found = await _desk(request).store.get(hid)
    if found is None:
        fail(404, "not_found", f"no handoff {hid}")
    sheet = Sheet(found.id, found.incident, found.accepted_at,
                  found.escalated_at or found.updated_at, found.status, found.reason)
    return web.Response(text=render_html(sheet), content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        "Cache-Control": "no-store"})


def _party(request: web.Request) -> str | None:
    """The force a partner's token limits its reading to; None for viewers and managers."""
    principal: Principal = request[PRINCIPAL]
    return principal.force if principal.role == "partner" else None


def _involves(handoff: dict[str, Any], force: str | None) -> bool:
    return force is None or force in (handoff["from"], handoff["to"])


@require("viewer", "partner")
async def get_handoff(request: web.Request) -> web.Response:
    hid = request.match_info["id"]
    well_formed = HANDOFF_ID.fullmatch(hid) is not None
    found = await _desk(request).get(hid) if well_formed else None
    if found is None or not _involves(found, _party(request)):
        fail(404, "not_found", f"no handoff {hid}" if well_formed else "no handoff has that id")
    return web.json_response(found)


@require("viewer", "partner")
async def list_handoffs(request: web.Request) -> web.Response:
    query = validate(HandoffQuery, query_params(request))
    party = _party(request)
    # The desk filters by destination only: a partner's view is filtered here, from as many
    # rows as a listing may hold
    fetch = query.limit if party is None else MAX_LIMIT
    rows = await _desk(request).query(status=query.status, to=query.to, limit=fetch)
    handoffs = [h for h in rows if _involves(h, party)][:query.limit]
    return web.json_response({"handoffs": handoffs, "count": len(handoffs)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/handoffs", post_handoff)
    app.router.add_get("/v1/handoffs", list_handoffs)
    app.router.add_get("/v1/handoffs/{id}", get_handoff)
    app.router.add_post("/v1/handoffs/{id}/acknowledgement", post_acknowledgement)
    app.router.add_post("/v1/handoffs/{id}/completion", post_completion)
    app.router.add_post("/v1/handoffs/{id}/paper", post_paper)
    app.router.add_get("/v1/handoffs/{id}/sheet", get_sheet)
