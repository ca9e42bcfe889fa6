"""The OpenAPI description served at /openapi.json, derived from the pydantic models that
validate requests and the typed records the handlers answer with, so it cannot drift from
what the service accepts and says."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from router import __version__
from router.engine.model import DecisionRecord
from router.handoff.incident import Incident
from router.http.calls import RouteRequest
from router.http.forces import OverrideRequest
from router.http.ops import Reloaded

REF = "#/components/schemas/{model}"
ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                   "field": {"type": "string"}},
}


def _schemas() -> dict[str, Any]:
    """Each schema under its component name, with the models it refers to hoisted beside it."""
    derived: dict[str, dict[str, Any]] = {
        "Decision": TypeAdapter(DecisionRecord).json_schema(ref_template=REF),
        "Reloaded": TypeAdapter(Reloaded).json_schema(ref_template=REF),
        **{model.__name__: model.model_json_schema(ref_template=REF)
           for model in (RouteRequest, OverrideRequest, Incident)},
    }
    schemas: dict[str, Any] = {"Error": ERROR}
    for name, schema in derived.items():
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return schemas


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _op(summary: str, role: str | None, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        code: ({"description": text} if isinstance(text, str) else text)
        for code, text in responses.items()}}
    if role:
        op["security"] = [{"bearer": []}]
        op["x-role"] = role
    for code in ("400", "401", "403", "404", "409", "413"):
        if code in op["responses"]:
            op["responses"][code] = {"description": op["responses"][code]["description"],
                                     "content": {"application/json": {
                                         "schema": {"$ref": "#/components/schemas/Error"}}}}
    op.update(extra)
    return op


def _json(schema: dict[str, Any] | str, text: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": text, "content": {"application/json": {"schema": ref}}}


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "required": n in ("call_id", "service", "origin"),
             "schema": {"type": "string"}} for n in names]


@cache
def spec() -> dict[str, Any]:
    auth = {"401": "missing or unknown token", "403": "role not allowed"}
    force = [{"name": "force", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths = {
        "/v1/route": {
            "post": _op("Decide where a call goes", "telephony",
                        {"200": _json("Decision", "the decision"), "400": "invalid request",
                         "409": "call_id already routed differently", **auth},
                        requestBody=_body(RouteRequest)),
            "get": _op("Decide where a call goes (query form; format=text gives only the SIP URI)",
                       "telephony", {"200": _json("Decision", "the decision, or text/plain URI"),
                                     "400": "invalid request", **auth},
                       parameters=_query("call_id", "service", "origin", "caller", "format")),
        },
        "/v1/calls/{call_id}/end": {"post": _op(
            "Free a call's capacity (idempotent)", "telephony", {"204": "ended", **auth},
            parameters=[{"name": "call_id", "in": "path", "required": True,
                         "schema": {"type": "string"}}])},
        "/v1/forces": {"get": _op("Live state, telemetry, calls in flight, headroom", "viewer",
                                  {"200": "per force", **auth})},
        "/v1/routing-table": {"get": _op("Current shares per origin and service", "viewer",
                                         {"200": "per origin and service", **auth})},
        "/v1/forces/{force}/override": {
            "put": _op("Declare a centre's state (audited)", "manager",
                       {"200": "declared", "400": "invalid body", "404": "unknown force", **auth},
                       requestBody=_body(OverrideRequest), parameters=force),
            "delete": _op("End a declaration", "manager",
                          {"200": "cleared", "404": "unknown force", **auth}, parameters=force),
        },
        "/v1/handoffs": {
            "post": _op("Hand an incident to another force's CAD", "partner",
                        {"202": "accepted (new)", "200": "duplicate of an accepted one",
                         "400": "invalid incident", "403": "not your force", "413": "too large",
                         **auth}, requestBody=_body(Incident)),
            "get": _op("Handoffs by status and destination", "viewer",
                       {"200": "list", "400": "invalid query", **auth},
                       parameters=_query("status", "to", "limit")),
        },
        "/v1/handoffs/{id}": {"get": _op(
            "One handoff with its history", "viewer", {"200": "handoff", "404": "unknown",
                                                      **auth},
            parameters=[{"name": "id", "in": "path", "required": True,
                         "schema": {"type": "string"}}])},
        "/v1/admin/reload": {"post": _op("Reload the config; an invalid one is refused",
                                         "manager", {"200": _json("Reloaded", "reloaded"),
                                                     "422": "invalid config, old one kept",
                                                     **auth})},
        "/metrics": {"get": _op("Prometheus metrics", None, {"200": "text exposition"})},
        "/healthz": {"get": _op("Liveness", None, {"200": "alive"})},
        "/readyz": {"get": _op("Readiness: every centre has evidence", None,
                               {"200": "ready", "503": "waiting for evidence"})},
        "/": {"get": _op("Control-room dashboard", None, {"200": "HTML"})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "overflow-router", "version": __version__,
                 "description": "Automatic failover of 999 and 101 calls between forces."},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(spec())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_handler)
