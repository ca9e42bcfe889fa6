"""HTTP handlers for calls: where a call goes (POST and GET /v1/route), and its end (with how
it ended at the centre, which feeds passive health)."""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.engine.calls import CallConflict
from router.engine.model import DecisionRecord, Service
from router.http.auth import require
from router.http.errors import (
    CallId,
    OneLine,
    fail,
    parse_body,
    query_params,
    read_body,
    read_json,
    validate,
)
from router.http.state import known_force, runtime
from router.watch.outliers import outcome_of


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    call_id: CallId
    service: Service
    origin: str = Field(min_length=1, max_length=32)
    caller: Annotated[OneLine, Field(max_length=64)] | None = None


class CallRef(BaseModel):
    """A call named in a path."""

    model_config = ConfigDict(frozen=True)
    call_id: CallId


def _route(request: web.Request, body: RouteRequest) -> DecisionRecord:
    rt = runtime(request)
    known_force(rt, body.origin, "origin")
    try:
        record, _ = rt.calls.route(body.call_id, body.service, body.origin, rt.watcher.snapshot)
    except CallConflict as exc:
        fail(409, "conflict", str(exc), "call_id")
    return record


@require("telephony")
async def post_route(request: web.Request) -> web.Response:
    return web.json_response(_route(request, await read_json(request, RouteRequest)))


@require("telephony")
async def get_route(request: web.Request) -> web.Response:
    """The query form, for SIP proxies that cannot send a body; format=text is the URI alone."""
    query = query_params(request)
    fmt = query.pop("format", "json")
    if fmt not in ("json", "text"):
        fail(400, "invalid", f"format: must be json or text, got {fmt!r}", "format")
    record = _route(request, validate(RouteRequest, query))
    if fmt == "text":
        return web.Response(text=record["sip_uri"])
    return web.json_response(record)


class CallEnd(BaseModel):
    """How the call ended at the centre it was sent to; optional, for passive health."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: Literal["answered", "failed", "no_answer", "cancelled"] | None = None
    sip_code: Annotated[int, Field(ge=100, le=699)] | None = None


@require("telephony")
async def end_call(request: web.Request) -> web.Response:
    """Free the call's capacity; an outcome other than `answered` counts against the centre
    (an empty body, or `{}`, says nothing about how it ended)."""
    call = validate(CallRef, {"call_id": request.match_info["call_id"]})
    raw = await read_body(request)
    ended = parse_body(raw, CallEnd) if raw.strip() else CallEnd()
    rt = runtime(request)
    destination = rt.calls.finish(call.call_id)
    outcome = outcome_of(ended.outcome, ended.sip_code)
    if destination is not None and outcome is not None:  # once per call: a retry is a no-op
        rt.watcher.call_outcome(destination, outcome)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/route", post_route)
    app.router.add_get("/v1/route", get_route)
    app.router.add_post("/v1/calls/{call_id}/end", end_call)
