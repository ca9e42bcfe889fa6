"""What every handler reads from the app: the running parts, and whether a force exists."""

from __future__ import annotations

from aiohttp import web

from router.http.errors import fail
from router.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


def runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def known_force(rt: Runtime, force: str, field: str, status: int = 400) -> str:
    """The force, if the running config has it; else a contract error naming `field`."""
    if force not in rt.config.forces:
        fail(status, "unknown_force", f"{field}: unknown force {force!r} "
             f"(known: {', '.join(rt.config.forces)})", field)
    return force
