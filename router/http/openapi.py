"""The OpenAPI description served at /openapi.json, derived from the pydantic models that
validate requests and the typed records the handlers answer with, so it cannot drift from
what the service accepts and says. tests/test_contract.py holds the service to it.

Where a handler builds its answer as a plain dict, its shape is a TypedDict in
router.http.shapes, and the schema is derived from that."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from router import __version__
from router.engine.model import CentreState, DecisionRecord
from router.handoff.incident import Incident, handoff_id
from router.http.auth import IMPLIED
from router.http.calls import CallEnd, RouteRequest
from router.http.errors import MAX_BODY_BYTES
from router.http.events import TICKET_TTL_S
from router.http.forces import OverrideRequest
from router.http.handoffs import (
    HANDOFF_ID,
    AcknowledgementRequest,
    CompletionRequest,
    HandoffQuery,
    PaperRequest,
)
from router.http.ops import Readiness, Reloaded
from router.http.shapes import (
    Alive,
    AuditRecords,
    Cleared,
    ConfigInvalid,
    Declared,
    Error,
    Forces,
    Handoff,
    HandoffList,
    Incoming,
    RoutingTable,
    Ticket,
)
from router.http.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER
from router.http.timeline import AuditQuery

REF = "#/components/schemas/{model}"

REQUESTS: tuple[type[BaseModel], ...] = (RouteRequest, CallEnd, OverrideRequest, Incident,
                                         HandoffQuery, AcknowledgementRequest, CompletionRequest,
                                         PaperRequest, AuditQuery)
RESPONSES: dict[str, Any] = {
    "Decision": DecisionRecord, "Reloaded": Reloaded, "Error": Error,
    "ConfigInvalid": ConfigInvalid, "Forces": Forces, "RoutingTable": RoutingTable,
    "Declared": Declared, "Cleared": Cleared, "Handoff": Handoff, "HandoffList": HandoffList,
    "Alive": Alive, "Readiness": Readiness, "Incoming": Incoming,
    "Ticket": Ticket, "AuditRecords": AuditRecords,
}


def _rename(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (REF.format(model=names.get(v.rpartition("/")[2], v.rpartition("/")[2]))
                    if k == "$ref" else _rename(v, names)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename(v, names) for v in node]
    return node


def _schemas() -> dict[str, Any]:
    """Requests in validation mode, responses in serialization mode, in one pass so a model
    used both ways (Incident) gets one name per mode if they differ; each response under the
    name the paths use (DecisionRecord is `Decision`)."""
    inputs = [(m.__name__, "validation", TypeAdapter(m)) for m in REQUESTS] + [
        (name, "serialization", TypeAdapter(tp)) for name, tp in RESPONSES.items()]
    refs, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
    names = {refs[(name, "serialization")]["$ref"].rpartition("/")[2]: name
             for name in RESPONSES}
    schemas = {names.get(k, k): v for k, v in defs.get("$defs", {}).items()}
    return _rename(_declarable(schemas), names)  # type: ignore[no-any-return]


def _declarable(schemas: dict[str, Any]) -> dict[str, Any]:
    """OverrideRequest's validator refuses `unknown` (only ever inferred); say so as an enum."""
    states = [s.value for s in CentreState if s is not CentreState.UNKNOWN]
    schemas["OverrideRequest"]["properties"]["state"] = {
        "allOf": [{"$ref": REF.format(model="CentreState")}], "enum": states}
    return schemas


# ---- paths ------------------------------------------------------------------------------------

# only for partners whose token names a signing key (router.http.signing)
SIGNATURE = [
    {"name": TIMESTAMP_HEADER, "in": "header", "required": False,
     "description": "Unix seconds when the body was signed; within 300 s of the router's clock",
     "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}},
    {"name": SIGNATURE_HEADER, "in": "header", "required": False,
     "description": "sha256=HEX: HMAC-SHA256 with the partner's key over TIMESTAMP.BODY",
     "schema": {"type": "string"}},
]

ANSWER_ERRORS = {
    "403": "not the handoff's destination, or not a partner",
    "404": "no such handoff",
    "409": "not delivered yet (`not_delivered`), or answered otherwise before, or final "
           "(`conflict`)",
    "503": "the handoff desk is starting, or could not store the answer"}

WHY = {"400": "invalid request; `field` names what is wrong", "401": "missing or unknown token",
       "403": "the token's role may not do this", "404": "no such resource",
       "408": "the body did not arrive in time",
       "413": f"body over {MAX_BODY_BYTES} bytes, or over the token's own `max_body_bytes`",
       "429": "the token is over its rate limit; `Retry-After` says when to try again"}


def _content(schema: str | dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    ref = {"$ref": REF.format(model=schema)} if isinstance(schema, str) else schema
    return {media: {"schema": ref}}


def _op(summary: str, roles: tuple[str, ...], ok: dict[str, Any], errors: dict[str, str],
        **extra: Any) -> dict[str, Any]:
    """An operation: its successes as given, every error as the contract's Error, a body's
    own errors where it has one, and, given the roles its handler requires, behind a bearer
    token (401 without one, 403 with another role's); `x-roles` lists every role let in."""
    if "requestBody" in extra:
        errors = {"400": WHY["400"], "408": WHY["408"], "413": WHY["413"], **errors}
    if roles:
        errors = {"401": WHY["401"], "403": WHY["403"], "429": WHY["429"], **errors}
    responses = {**ok, **{code: {"description": text, "content": _content("Error")}
                          for code, text in errors.items()}}
    for code in ("429", "503"):
        if code in errors:  # when to try again
            responses[code]["headers"] = {"Retry-After": {
                "description": "seconds", "schema": {"type": "integer", "minimum": 1}}}
    op: dict[str, Any] = {"summary": summary, "responses": dict(sorted(responses.items()))}
    if roles:
        op["security"] = [{"bearer": []}]
        op["x-roles"] = sorted(set().union(*(IMPLIED[role] for role in roles)))
    return op | extra


def _ok(text: str, schema: str | dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {"description": text, **({"content": _content(schema)} if schema else {}), **more}


def _body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model=model.__name__)}, "example": example}}}


def _query(model: type[BaseModel], schemas: dict[str, Any],
           example: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A model's fields as query parameters; an optional field is simply left out, so the
    `null` pydantic allows for it has no query form."""
    example = example or {}
    schema = schemas[model.__name__]
    out = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        branches = [b for b in prop.pop("anyOf", []) if b != {"type": "null"}]
        if branches:
            prop.update(branches[0] if len(branches) == 1 else {"anyOf": branches})
        if prop.get("default", 0) is None:
            del prop["default"]
        param = {"name": name, "in": "query", "required": name in schema.get("required", []),
                 "schema": prop}
        out.append(param | ({"example": example[name]} if name in example else {}))
    return out


def _path(name: str, schema: dict[str, Any], example: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "example": example}


ROUTE = {"call_id": "c-1", "service": "999", "origin": "met"}
INCIDENT: dict[str, Any] = {
    "incident_id": "KNT-2025-0001", "from": "kent", "to": "met", "priority": "P1",
    "service": "999", "opened_at": "2025-03-25T22:28:00Z", "location": {"lat": 51.5, "lon": -0.12},
    "category": "assault", "summary": "caller reports an assault in progress"}


def _paths(schemas: dict[str, Any]) -> dict[str, Any]:
    call_id = schemas["RouteRequest"]["properties"]["call_id"]  # the same rule as the body's
    force = [_path("force", {"type": "string", "minLength": 1}, "met")]
    unknown_force = {"404": "unknown force"}
    location = {"Location": {"description": "the handoff's URL", "schema": {"type": "string"}}}
    hid = [_path("id", {"type": "string", "pattern": f"^{HANDOFF_ID.pattern}$"},
                 handoff_id(INCIDENT["from"], INCIDENT["incident_id"]))]
    route_format = {"name": "format", "in": "query", "required": False,
                    "schema": {"enum": ["json", "text"], "default": "json"}}
    decision = {"description": "the decision (format=text: only the SIP URI)",
                "content": {**_content("Decision"), **_content({"type": "string"}, "text/plain")}}
    return {
        "/v1/route": {
            "post": _op("Decide where a call goes", ("telephony",), {"200": _ok(
                "the decision", "Decision")}, {"409": "call_id already routed differently"},
                requestBody=_body(RouteRequest, ROUTE)),
            "get": _op("Decide where a call goes (query form, for SIP proxies)", ("telephony",),
                       {"200": decision}, {"400": WHY["400"],
                                           "409": "call_id already routed differently"},
                       parameters=[*_query(RouteRequest, schemas, ROUTE), route_format]),
        },
        "/v1/calls/{call_id}/end": {"post": _op(
            "Free a call's capacity (idempotent); optionally say how it ended at the centre",
            ("telephony",), {"204": _ok("ended")}, {"404": WHY["404"]},
            parameters=[_path("call_id", call_id, "c-1")], requestBody={
                "required": False, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="CallEnd")},
                    "example": {"outcome": "failed", "sip_code": 486}}}})},
        "/v1/forces": {"get": _op("Live state, telemetry, calls in flight, headroom", ("viewer",),
                                  {"200": _ok("per force", "Forces")}, {})},
        "/v1/routing-table": {"get": _op("Current shares per origin and service", ("viewer",),
                                         {"200": _ok("per origin and service", "RoutingTable")},
                                         {})},
        "/v1/forces/{force}/override": {
            "put": _op("Declare a centre's state (audited)", ("manager",),
                       {"200": _ok("declared", "Declared")},
                       unknown_force,
                       requestBody=_body(OverrideRequest, {"state": "down", "reason": "CAD fault",
                                                           "expires_in_s": 3600}),
                       parameters=force),
            "delete": _op("End a declaration", ("manager",), {"200": _ok("cleared", "Cleared")},
                          unknown_force, parameters=force),
        },
        "/v1/handoffs": {
            "post": _op("Hand an incident to another force's CAD", ("partner",), {
                "202": _ok("accepted (new)", "Handoff", headers=location),
                "200": _ok("a duplicate of one accepted before", "Handoff", headers=location)},
                {"401": "missing or unknown token; or, for a partner that signs, a missing "
                        "(`signature_required`), wrong (`bad_signature`) or old "
                        "(`stale_signature`) signature",
                 "403": "not the token's own force, or not a partner",
                 "409": "this (from, incident_id) was accepted before with other content",
                 "503": "the handoff desk is starting, or could not store it"},
                requestBody=_body(Incident, INCIDENT), parameters=SIGNATURE),
            "get": _op("Handoffs by status and destination; a partner sees its own force's",
                       ("viewer", "partner"),
                       {"200": _ok("the handoffs", "HandoffList")},
                       {"400": WHY["400"], "503": "the handoff desk is starting"},
                       parameters=_query(HandoffQuery, schemas)),
        },
        "/v1/handoffs/{id}": {"get": _op(
            "One handoff with its history", ("viewer", "partner"),
            {"200": _ok("the handoff", "Handoff")},
            {"404": "no such handoff (or, to a partner, not its force's)",
             "503": "the handoff desk is starting"}, parameters=hid)},
        "/v1/handoffs/{id}/acknowledgement": {"post": _op(
            "A dispatcher at the destination accepts or rejects the handoff", ("partner",),
            {"200": _ok("recorded (or a repeat of what was)", "Handoff")}, ANSWER_ERRORS,
            requestBody=_body(AcknowledgementRequest, {
                "outcome": "rejected", "by": "PS 42 Jones",
                "cause": "location outside our area"}), parameters=hid)},
        "/v1/handoffs/{id}/completion": {"post": _op(
            "The incident is closed at the destination: completed or aborted", ("partner",),
            {"200": _ok("recorded (or a repeat of what was)", "Handoff")}, ANSWER_ERRORS,
            requestBody=_body(CompletionRequest, {"outcome": "completed",
                                                  "note": "suspect arrested"}),
            parameters=hid)},
        "/v1/handoffs/{id}/paper": {"post": _op(
            "Handled on paper (a manager's word): final, no more delivery attempts or "
            "escalation; the sender is told and it is audited", ("manager",),
            {"200": _ok("recorded", "Handoff")},
            {"404": "no such handoff", "409": "already final (`conflict`)",
             "503": "the handoff desk is starting, or could not record it"},
            requestBody=_body(PaperRequest, {"reason": "phoned to the Met's duty officer",
                                             "operator": "Insp. Patel"}), parameters=hid)},
        "/v1/handoffs/{id}/sheet": {"get": _op(
            "The handoff's printable escalation sheet", ("viewer",), {"200": {
                "description": "HTML, print-ready",
                "content": _content({"type": "string"}, "text/html")}},
            {"404": "no such handoff", "503": "the handoff desk is starting"},
            parameters=hid)},
        "/v1/incoming": {"get": _op(
            "A partner's view: other forces' calls routed to it now", ("partner",),
            {"200": _ok("shares whose destination is the token's force", "Incoming")}, {})},
        "/v1/events/ticket": {"post": _op(
            f"A single-use ticket for the live stream, valid {TICKET_TTL_S:g} s (EventSource "
            "cannot send a bearer token)", ("viewer", "partner"),
            {"201": _ok("the ticket, and who the token is", "Ticket")}, {})},
        "/v1/events": {"get": _op(
            "Live updates (Server-Sent Events): hello, board, handoff, alert", (),
            {"200": {"description": "an event stream until the client or the service stops",
                     "content": _content({"type": "string"}, "text/event-stream")}},
            {"400": "no ticket", "403": "ticket unknown, used or expired",
             "503": "too many live dashboards, or the service is stopping"},
            parameters=[{"name": "ticket", "in": "query", "required": True,
                         "schema": {"type": "string", "minLength": 1}}])},
        "/v1/audit": {"get": _op(
            "The latest audit records, newest first (the dashboard's timeline)", ("viewer",),
            {"200": _ok("records", "AuditRecords")}, {"400": WHY["400"]},
            parameters=_query(AuditQuery, schemas))},
        "/v1/admin/reload": {"post": _op(
            "Reload the config file; an invalid one is refused and the old one stays",
            ("manager",), {"200": _ok("reloaded", "Reloaded"), "422": _ok(
                "invalid config, old one kept", "ConfigInvalid")}, {})},
        "/metrics": {"get": _op("Prometheus metrics", (), {"200": {
            "description": "text exposition", "content": _content({"type": "string"},
                                                                  "text/plain")}}, {})},
        "/healthz": {"get": _op("Liveness", (), {"200": _ok("alive", "Alive")}, {})},
        "/readyz": {"get": _op("Readiness: the router's own dependencies (config, handoff "
                               "store), never a centre's health", (), {
            "200": _ok("ready", "Readiness"), "503": _ok("a dependency is not", "Readiness")},
            {})},
        "/openapi.json": {"get": _op("This document", (), {"200": _ok(
            "OpenAPI 3.1", {"type": "object", "required": ["openapi", "paths"]})}, {})},
        "/": {"get": _op("Control-room dashboard", (), {"200": {
            "description": "HTML", "content": _content({"type": "string"}, "text/html")}}, {})},
    }


@cache
def spec() -> dict[str, Any]:
    schemas = _schemas()
    return {
        "openapi": "3.1.0",
        "info": {"title": "overflow-router", "version": __version__,
                 "description": "Automatic failover of 999 and 101 calls between forces."},
        "paths": _paths(schemas),
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(spec())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_handler)
