"""Contract tests: schemathesis drives the real service over loopback with requests generated
from its own /openapi.json, once per role (and with no token), and every answer must be
documented there: no 5xx, a declared status code and content type, a body that matches the
declared schema, and nothing logged at ERROR while it answers.

The document is `openapi.spec()`, checked to be exactly what the live service serves. It is
loaded at import so that `schema.parametrize()` makes one test per operation and role;
schemathesis's fixture-based loader (`schemathesis.pytest.from_fixture`), which would read
it from the live URL, fails under pytest 9 (it sets `request.node._nodeid`). Generation is
derandomized with a fixed seed and bounded per operation, so a CI failure reproduces locally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from schemathesis import Case, CheckContext, CheckFunction, Config, Response
from service_support import TOKENS, Running, make_config, running_service

from router.http.openapi import spec

SEED = 20250325
MAX_EXAMPLES = 40  # per operation, role and phase
ROLES = [None, *TOKENS]  # no token, telephony, viewer, manager, partner:kent

CONFIG = Config.from_dict({
    "seed": SEED,
    "generation": {
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        # each test sends its role's token itself (and the no-token run sends none)
        "with-security-parameters": False,
    },
    "phases": {
        "coverage": {"generate-duplicate-query-parameters": True},
        "stateful": {"enabled": False},
    },
})
schema = schemathesis.openapi.from_dict(spec(), config=CONFIG)


def errors_follow_the_contract(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx is the contract's JSON error, documented or not: a 405 for a method
    no route has, a 404 for a path parameter that matches no route. (/readyz's 503 is a
    readiness report, documented as such.)"""
    if response.status_code < 400 or (case.operation.path, response.status_code) == (
            "/readyz", 503):
        return None
    types = response.headers.get("content-type", [""])
    assert types[0].startswith("application/json"), f"an error as {types[0]!r}, not JSON"
    body = json.loads(response.content)
    assert isinstance(body, dict), f"an error body that is not an object: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"], f"no error code: {body!r}"
    assert isinstance(body.get("message"), str) and body["message"], f"no message: {body!r}"
    assert isinstance(body.get("field", ""), str), f"a field that is not a name: {body!r}"
    return True


CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.unsupported_method,  # 405 with Allow for a method the path lacks
    errors_follow_the_contract,
]
# 503 is /readyz's documented answer while a dependency (the handoff store) is not, not a
# server error; its body is held to the Readiness schema
READYZ_CHECKS = [c for c in CHECKS if c is not schemathesis.checks.not_a_server_error]


@dataclass
class Live:
    base: str
    routes: web.UrlDispatcher
    errors: list[logging.LogRecord] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]):
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


Started = Callable[[Running, asyncio.AbstractEventLoop, asyncio.Event], None]


def _serve(config: Path, started: Started) -> None:
    """The service as service_support runs it, on an event loop of its own in this thread:
    the schemathesis client is synchronous and would block a loop it shared."""

    async def main() -> None:
        async with running_service(config) as running:
            stop = asyncio.Event()
            started(running, asyncio.get_running_loop(), stop)
            await stop.wait()

    asyncio.run(main())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    config = make_config(tmp_path_factory.mktemp("contract"))
    ready = threading.Event()
    found: dict[str, Any] = {}

    def started(running: Running, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        found.update(running=running, loop=loop, stop=stop)
        ready.set()

    thread = threading.Thread(target=_serve, args=(config, started), name="contract-service",
                              daemon=True)
    thread.start()
    assert ready.wait(30), "the service did not start within 30 s"
    live = Live(found["running"].base, found["running"].service.app.router)
    handler = _Collect(live.errors)
    logging.getLogger().addHandler(handler)
    try:
        yield live
    finally:
        logging.getLogger().removeHandler(handler)
        found["loop"].call_soon_threadsafe(found["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the service did not stop within 30 s"


def test_the_live_service_serves_this_document(live: Live) -> None:
    with urllib.request.urlopen(live.base + "/openapi.json", timeout=10) as resp:
        served = json.load(resp)
    assert served == json.loads(json.dumps(spec()))


def test_every_route_is_documented(live: Live) -> None:
    """Each route the app serves is an operation of the document, and nothing more."""
    served = {(route.resource.canonical, route.method) for route in live.routes.routes()
              if route.method != "HEAD" and route.resource is not None}
    documented = {(path, method.upper()) for path, ops in spec()["paths"].items()
                  for method in ops}
    assert served == documented


def answered_as_the_roles_say(case: Case, role: str | None, response: Response) -> None:
    """`x-roles` lists the roles the service lets in: no token gets a 401, another role's a
    403 naming no field (a 403 naming one is about the input, e.g. a partner's `from`). A path
    that matches no route is answered 404 before anyone is asked for a token."""
    if case.method.upper() != case.operation.method.upper():
        return  # an undeclared method, answered by routing
    roles = spec()["paths"][case.operation.path][case.operation.method].get("x-roles", [])
    status = response.status_code
    body = json.loads(response.content) if status >= 400 else {}
    refused = status == 401 or (status == 403 and "field" not in body)
    unrouted = status == 404 and "{" in case.operation.path
    where = f"{case.method} {case.formatted_path} as {role or 'no token'}: {status} {body}"
    if not roles or (role is not None and role.partition(":")[0] in roles):
        assert not refused, f"refused, though x-roles lets it in: {where}"
    elif role is None:
        assert status == 401 or unrouted, f"not 401 without a token: {where}"
    else:
        assert (status == 403 and "field" not in body) or unrouted, \
            f"not refused, though x-roles ({roles}) leaves it out: {where}"


@schema.parametrize()
@pytest.mark.parametrize("role", ROLES, ids=lambda r: r or "no-token")
def test_contract(case: Case, role: str | None, live: Live) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
    seen = len(live.errors)
    checks = READYZ_CHECKS if case.operation.path == "/readyz" else CHECKS
    response = case.call_and_validate(base_url=live.base, headers=headers, checks=checks)
    answered_as_the_roles_say(case, role, response)
    logged = [r.getMessage() for r in live.errors[seen:]]
    assert not logged, f"{case.method} {case.formatted_path} logged errors: {logged}"
