"""HTTP handlers for calls: where a call goes (POST and GET /v1/route), and its end."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.engine.calls import CallConflict
from router.engine.model import DecisionRecord, Service
from router.http.auth import require
from router.http.errors import CallId, OneLine, fail, query_params, read_json, validate
from router.http.state import known_force, runtime


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


@require("telephony")
async def end_call(request: web.Request) -> web.Response:
    call = validate(CallRef, {"call_id": request.match_info["call_id"]})
    runtime(request).calls.end(call.call_id)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/route", post_route)
    app.router.add_get("/v1/route", get_route)
    app.router.add_post("/v1/calls/{call_id}/end", end_call)
