"""HTTP handlers for operations: config reload, Prometheus metrics, liveness and readiness."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from router.config import ConfigError
from router.engine.model import CentreState
from router.http.auth import PRINCIPAL, require
from router.http.state import runtime

log = logging.getLogger(__name__)


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
        reloaded = runtime(request).reload(source=who)
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


async def readyz(request: web.Request) -> web.Response:
    """Ready once every centre has some evidence: before that, decisions would be guesses."""
    rt = runtime(request)
    snapshot = rt.watcher.snapshot
    waiting = [f for f in rt.config.forces if snapshot.get(f).state is CentreState.UNKNOWN]
    if waiting:
        return web.json_response({"status": "waiting", "no_evidence_yet": waiting}, status=503)
    return web.json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/admin/reload", post_reload)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
