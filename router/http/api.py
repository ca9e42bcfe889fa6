"""HTTP handlers for routing, centres and administration: parse, call, serialise.

Incident handoffs have their own handlers in router/api_handoffs.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.config import ConfigError
from router.engine.calls import CallConflict
from router.engine.model import CentreState, Service
from router.http.auth import PRINCIPAL, require
from router.http.errors import error_response, fail, read_json, validate
from router.infra import metrics
from router.runtime import RUNTIME, Runtime

log = logging.getLogger(__name__)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    call_id: str = Field(min_length=1, max_length=256)
    service: Service
    origin: str = Field(min_length=1, max_length=32)
    caller: str | None = Field(default=None, max_length=64)


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    state: CentreState
    reason: str = Field(min_length=1, max_length=500)
    expires_in_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = None

    @field_validator("state")
    @classmethod
    def _declarable(cls, value: CentreState) -> CentreState:
        if value is CentreState.UNKNOWN:
            raise ValueError("a manager declares a state; 'unknown' is only ever inferred")
        return value


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def _known_force(rt: Runtime, force: str, field: str, status: int = 400) -> str:
    if force not in rt.config.forces:
        fail(status, "unknown_force", f"{field}: unknown force {force!r} "
             f"(known: {', '.join(rt.config.forces)})", field)
    return force


def _route(request: web.Request, body: RouteRequest) -> dict[str, str]:
    rt = _runtime(request)
    _known_force(rt, body.origin, "origin")
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
    query = dict(request.query)
    fmt = query.pop("format", "json")
    if fmt not in ("json", "text"):
        fail(400, "invalid", f"format: must be json or text, got {fmt!r}", "format")
    record = _route(request, validate(RouteRequest, query))
    if fmt == "text":
        return web.Response(text=record["sip_uri"])
    return web.json_response(record)


@require("telephony")
async def end_call(request: web.Request) -> web.Response:
    _runtime(request).calls.end(request.match_info["call_id"])
    return web.Response(status=204)


@require("viewer")
async def get_forces(request: web.Request) -> web.Response:
    rt = _runtime(request)
    status = rt.watcher.status()
    out: dict[str, Any] = {}
    for fid, force in rt.config.forces.items():
        load = rt.calls.load(fid)
        aid = force.mutual_aid
        out[fid] = {
            "name": force.name,
            **status.get(fid, {}),
            "calls_in_flight": load["in_flight"],
            "calls_in_flight_by_service": {s: load[f"in_flight_{s}"] for s in ("999", "101")},
            "aid_in_flight": load["aid"],
            "capacity": {"handlers_on_duty": force.centre.handlers_on_duty,
                         "overflow_queue": force.centre.overflow_queue,
                         "max_queue": force.centre.max_queue},
            "headroom": {"aid_999": max(aid.max_concurrent - load["aid"], 0),
                         "aid_101": max(aid.max_concurrent - aid.reserve_999 - load["aid"], 0)},
        }
    return web.json_response({"forces": out, "fail_static": rt.watcher.fail_static})


@require("viewer")
async def get_routing_table(request: web.Request) -> web.Response:
    rt = _runtime(request)
    return web.json_response({"routing": rt.calls.routing_table(rt.watcher.snapshot)})


@require("manager")
async def put_override(request: web.Request) -> web.Response:
    rt = _runtime(request)
    force = _known_force(rt, request.match_info["force"], "force", status=404)
    body = await read_json(request, OverrideRequest)
    who = request[PRINCIPAL]
    rt.watcher.override(force, body.state, body.reason, expires_in_s=body.expires_in_s,
                        source=f"manager:{who.env}")
    return web.json_response({"force": force, **rt.watcher.status()[force]})


@require("manager")
async def delete_override(request: web.Request) -> web.Response:
    rt = _runtime(request)
    force = _known_force(rt, request.match_info["force"], "force", status=404)
    cleared = rt.watcher.clear_override(force, source=f"manager:{request[PRINCIPAL].env}")
    return web.json_response({"force": force, "cleared": cleared, **rt.watcher.status()[force]})


@require("manager")
async def post_reload(request: web.Request) -> web.Response:
    rt = _runtime(request)
    try:
        reloaded = rt.reload()
    except ConfigError as exc:
        log.error("config reload refused; keeping the running config:\n%s", exc)
        return web.json_response(
            {"error": "config_invalid", "message": "the new config is invalid; the old one stays",
             "issues": [str(i) for i in exc.issues]}, status=422)
    return web.json_response({"status": "reloaded", "forces": list(reloaded.config.forces),
                              "restart_required": reloaded.restart_required})


async def get_metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once every centre has some evidence: before that, decisions would be guesses."""
    rt = _runtime(request)
    snapshot = rt.watcher.snapshot
    waiting = [f for f in rt.config.forces if snapshot.get(f).state is CentreState.UNKNOWN]
    if waiting:
        return web.json_response({"status": "waiting", "no_evidence_yet": waiting}, status=503)
    return web.json_response({"status": "ready"})


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error is contract-shaped JSON; an unexpected one is logged, never leaked."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":  # ours, already contract-shaped
            response = web.Response(status=exc.status, text=exc.text,
                                    content_type="application/json")
        else:
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
                exc.status, "http_error")
            response = error_response(exc.status, code, f"{request.method} {request.path}: "
                                      f"{exc.reason}")
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = error_response(500, "internal", "internal error; see the router's log")
    metrics.child(metrics.HTTP_REQUESTS, name, str(response.status)).inc()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/route", post_route)
    app.router.add_get("/v1/route", get_route)
    app.router.add_post("/v1/calls/{call_id}/end", end_call)
    app.router.add_get("/v1/forces", get_forces)
    app.router.add_get("/v1/routing-table", get_routing_table)
    app.router.add_put("/v1/forces/{force}/override", put_override)
    app.router.add_delete("/v1/forces/{force}/override", delete_override)
    app.router.add_post("/v1/admin/reload", post_reload)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
