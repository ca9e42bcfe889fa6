"""HTTP handlers for operations: config reload, Prometheus metrics, liveness and readiness."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from router.config import ConfigError
from router.engine.model import CentreState
from router.handoff.desk import HandoffDesk
from router.http.auth import PRINCIPAL, require
from router.http.state import runtime

log = logging.getLogger(__name__)

READY_STORE_TIMEOUT_S = 1.0


class Reloaded(TypedDict):  # the OpenAPI schema is derived from it
    """A reload that was applied."""

    status: Literal["reloaded"]
    forces: list[str]
    restart_required: Annotated[list[str], Field(
        description="changed keys that only a restart applies, e.g. handoff.store")]


@require("manager")
async def post_reload(request: web.Request) -> web.Response:
    try:
        principal = request[PRINCIPAL]
        token = f"manager:{principal.env}"
        who = f"{principal.operator} ({token})" if principal.operator else token
        reloaded = await runtime(request).reload_async(source=who)
    except ConfigError as exc:
        log.error("config reload refused; keeping the running config:\n%s", exc)
        return web.json_response(
            {"error": "config_invalid", "message": "the new config is invalid; the old one stays",
             "issues": [str(i) for i in exc.issues]}, status=422)
    return web.json_response(Reloaded(status="reloaded", forces=list(reloaded.config.forces),
                                      restart_required=reloaded.restart_required))


async def get_metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Readiness(TypedDict):  # the OpenAPI schema is derived from it
    """Whether this router can do its own job; centres' health is not its readiness."""

    status: Literal["ready", "not_ready"]
    checks: Annotated[dict[str, str], Field(
        description="per dependency: `ok`, or what is wrong (config, handoff_store)")]
    no_evidence_yet: Annotated[list[str], Field(
        description="centres with no evidence yet: informational, never makes it unready")]
    instance: Annotated[str, Field(description="this router's name among several "
                                               "(`OVERFLOW_INSTANCE`)")]
    leader: Annotated[bool, Field(description="whether it leads them now: it alone "
                                              "publishes retained MQTT state and alerts")]


async def readyz(request: web.Request) -> web.Response:
    """Ready while the router's own dependencies are: a config loaded, and the handoff store
    answering a read within READY_STORE_TIMEOUT_S when the handoff desk runs. A force's
    outage (or a centre not yet probed) is the router's business to route around, not a
    reason for a load balancer to take the router away: 999 calls would lose it too."""
    rt = runtime(request)
    checks = {"config": "ok" if rt.config.forces else "no config loaded",
              "handoff_store": await _store_check(rt.desk)}
    snapshot = rt.watcher.snapshot
    unknown = [f for f in rt.config.forces if snapshot.get(f).state is CentreState.UNKNOWN]
    ready = all(v in ("ok", "not used") for v in checks.values())
    return web.json_response(
        Readiness(status="ready" if ready else "not_ready", checks=checks,
                  no_evidence_yet=unknown, instance=rt.instance,
                  leader=rt.leadership is None or rt.leadership.leading),
        status=200 if ready else 503)


async def _store_check(desk: HandoffDesk | None) -> str:
    if desk is None:
        return "not used"
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT_S):
            await desk.store.get("readyz")
    except TimeoutError:
        return f"no answer within {READY_STORE_TIMEOUT_S:g}s"
    except Exception as exc:  # any failure of the store is the answer here
        return f"unreachable: {type(exc).__name__}: {exc}"[:200]
    return "ok"


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/admin/reload", post_reload)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
