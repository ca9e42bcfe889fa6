"""HTTP handlers for forces: their live state, the routing table, and managers' declarations."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.engine.model import CentreState, Service
from router.engine.rules import HomeShare, diversion_json, headline
from router.http.auth import PRINCIPAL, require
from router.http.errors import OneLine, fail, query_params, read_json, validate
from router.http.state import known_force, runtime
from router.runtime import Runtime


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    state: CentreState
    reason: Annotated[OneLine, Field(min_length=1, max_length=500)]  # one audit log line
    expires_in_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = None
    # who declares: required unless the token names its operator
    operator: Annotated[OneLine, Field(min_length=1, max_length=100)] | None = None

    @field_validator("state")
    @classmethod
    def _declarable(cls, value: CentreState) -> CentreState:
        if value is CentreState.UNKNOWN:
            raise ValueError("a manager declares a state; 'unknown' is only ever inferred")
        return value


def _force_json(rt: Runtime, fid: str, status: dict[str, Any], home: HomeShare,
                state: CentreState) -> dict[str, Any]:
    force = rt.config.forces[fid]
    load = rt.calls.load(fid)
    headroom = rt.calls.policy.rules.headroom(fid, rt.calls.ledger)
    return {
        "name": force.name,
        **status,
        **diversion_json(state, home),
        "calls_in_flight": load["in_flight"],
        "calls_in_flight_by_service": {s.value: load[f"in_flight_{s.value}"] for s in Service},
        "aid_in_flight": load["aid"],
        "capacity": {"handlers_on_duty": force.centre.handlers_on_duty,
                     "overflow_queue": force.centre.overflow_queue,
                     "max_queue": force.centre.max_queue},
        "headroom": {f"aid_{s.value}": headroom[s] for s in Service},
    }


def forces_json(rt: Runtime) -> dict[str, Any]:
    """`GET /v1/forces`, also pushed to dashboards (router.http.events)."""
    snapshot = rt.watcher.snapshot
    status = rt.watcher.status()
    diversions = rt.calls.diversions(snapshot)
    forces = {fid: _force_json(rt, fid, status.get(fid, {}), diversions[fid],
                               snapshot.get(fid).state) for fid in rt.config.forces}
    return {"forces": forces, "fail_static": rt.watcher.fail_static}


def routing_json(rt: Runtime) -> dict[str, Any]:
    return {"routing": rt.calls.routing_table(rt.watcher.snapshot)}


def incoming_json(rt: Runtime, force: str) -> dict[str, Any]:
    """A partner's view of the board: the calls of other forces routed to it now (each
    origin's shares whose destination is `force`, with the origin's headline), and the aid it
    gives. Nothing about forces that send it nothing."""
    snapshot = rt.watcher.snapshot
    diversions = rt.calls.diversions(snapshot)
    table = rt.calls.routing_table(snapshot)
    incoming = [{"origin": origin, "service": service, **share,
                 "origin_headline": headline(snapshot.get(origin).state, diversions[origin])}
                for origin, services in table.items() if origin != force
                for service, shares in services.items()
                for share in shares if share["destination"] == force and share["share"] > 0]
    load = rt.calls.load(force) if force in rt.config.forces else {"aid": 0}
    headroom = (rt.calls.policy.rules.headroom(force, rt.calls.ledger)
                if force in rt.config.forces else {})
    return {"force": force, "incoming": incoming, "aid_in_flight": load["aid"],
            "headroom": {f"aid_{s.value}": headroom.get(s, 0) for s in Service}}


@require("viewer")
async def get_forces(request: web.Request) -> web.Response:
    return web.json_response(forces_json(runtime(request)))


@require("viewer")
async def get_routing_table(request: web.Request) -> web.Response:
    return web.json_response(routing_json(runtime(request)))


@require("partner")
async def get_incoming(request: web.Request) -> web.Response:
    return web.json_response(incoming_json(runtime(request), str(request[PRINCIPAL].force)))


def _declarer(request: web.Request, given: str | None) -> tuple[str, str]:
    """(`manager:WHO`, the token's variable): a declaration names a person, never only a
    variable; the `manager:` prefix keeps the kind of source (a metric label) apart."""
    principal = request[PRINCIPAL]
    who = given or principal.operator
    if who is None:
        fail(400, "invalid", "operator: required: say who is declaring (this token names no "
             "operator)", "operator")
    return f"manager:{who}", principal.env


class ClearQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    operator: Annotated[OneLine, Field(min_length=1, max_length=100)] | None = None


@require("manager")
async def put_override(request: web.Request) -> web.Response:
    rt = runtime(request)
    force = known_force(rt, request.match_info["force"], "force", status=404)
    body = await read_json(request, OverrideRequest)
    who, token = _declarer(request, body.operator)
    rt.watcher.override(force, body.state, body.reason, expires_in_s=body.expires_in_s,
                        source=who, token=token)
    return web.json_response({"force": force, **rt.watcher.status()[force],
                              "remembered": await _remember(rt, force)})


async def _remember(rt: Runtime, force: str) -> bool:
    """On disk (and with the other routers) before the answer; if the store is away the
    declaration stands in memory, is written once it is back, and the answer says so."""
    return rt.keeper is not None and await rt.keeper.remember(force)


@require("manager")
async def delete_override(request: web.Request) -> web.Response:
    rt = runtime(request)
    force = known_force(rt, request.match_info["force"], "force", status=404)
    who, token = _declarer(request, validate(ClearQuery, query_params(request)).operator)
    cleared = rt.watcher.clear_override(force, source=who, token=token)
    remembered = await _remember(rt, force) if cleared else True
    return web.json_response({"force": force, "cleared": cleared, **rt.watcher.status()[force],
                              "remembered": remembered})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/forces", get_forces)
    app.router.add_get("/v1/routing-table", get_routing_table)
    app.router.add_get("/v1/incoming", get_incoming)
    app.router.add_put("/v1/forces/{force}/override", put_override)
    app.router.add_delete("/v1/forces/{force}/override", delete_override)
