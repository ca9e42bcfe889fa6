"""Small helpers every HTTP handler shares: JSON errors and validated input.

Errors follow the contract: 4xx with `{"error": CODE, "message": TEXT, "field"?: NAME}`. The
middleware makes every error so, aiohttp's own 404/405/413 and unexpected ones alike, and the
connection layer (`server.py`) those raised before the middleware runs.

A body is read in two steps, `read_body` (every byte, bounded in size and time) then
`parse_body` (JSON into a model), so a signature can be checked over the exact bytes between;
`read_json` is both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any, NoReturn, TypeVar

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json

from router.infra import metrics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024  # the EIDO conveyance's subscription limit; ample for one incident
BODY_LIMIT = web.RequestKey("body_limit", int)  # a token's own limit, set by auth.require
BODY_TIMEOUT_S = 10.0  # for the whole body once the head is in, so a slow sender holds little

# Free text and identifiers that arrive over HTTP end up in logs, the audit log, SIP and MQTT:
# an identifier is visible ASCII (as a SIP Call-ID is, RFC 3261 §25.1); text has no controls.
VISIBLE_ASCII = r"^[!-~]+$"
NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$"
PATTERN_MESSAGES = {
    VISIBLE_ASCII: "must be printable ASCII, without spaces or control characters",
    NO_CONTROLS: "must not contain control characters or line breaks",
}
CALL_ID_MAX = 256
CallId = Annotated[str, Field(min_length=1, max_length=CALL_ID_MAX, pattern=VISIBLE_ASCII)]
OneLine = Annotated[str, Field(pattern=NO_CONTROLS)]  # add a max_length where it is used


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


class HttpError(web.HTTPException):
    """Raise from a handler to answer with a contract-shaped JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status_code = status
        super().__init__(
            headers=headers,
            text=json.dumps({"error": code, "message": message}
                            | ({"field": field} if field else {})),
            content_type="application/json",
        )


def fail(status: int, code: str, message: str, field: str | None = None, *,
         headers: dict[str, str] | None = None) -> NoReturn:
    raise HttpError(status, code, message, field, headers)


def validate(model: type[M], data: Any) -> M:
    """Validate data against a model; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        kind = err["type"]
        message = {"extra_forbidden": "unknown field", "missing": "required field is missing",
                   "string_pattern_mismatch": PATTERN_MESSAGES.get(
                       str(err.get("ctx", {}).get("pattern")), err["msg"])}.get(kind, err["msg"])
        fail(400, "invalid", f"{field}: {message}" if field else message, field)


def query_params(request: web.Request) -> dict[str, str]:
    """The query, one value per name. A repeated name is refused: which value counts would be
    a guess, and two parts of a chain may guess differently."""
    query = request.query
    for name in query:
        if len(query.getall(name)) > 1:
            fail(400, "invalid", f"{name}: given more than once", name)
    return dict(query)


async def read_body(request: web.Request) -> bytes:
    """The whole body, however many segments it arrives in: 413 past the caller's limit
    (its token's, else MAX_BODY_BYTES), 408 if it is not all in within BODY_TIMEOUT_S."""
    limit = request.get(BODY_LIMIT, MAX_BODY_BYTES)
    if request.content_length is not None and request.content_length > limit:
        fail(413, "too_large", f"body is {request.content_length} bytes; limit {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    fail(413, "too_large", f"body exceeds {limit} bytes")
    except TimeoutError:
        fail(408, "timeout", f"body not received within {BODY_TIMEOUT_S:g} s")
    except (RequestPayloadError, ConnectionResetError):  # bad chunking or encoding; gone
        request.content.feed_eof()  # nothing more to read: aiohttp must not try again
        fail(400, "bad_body", "body could not be read: broken chunked or content encoding, "
             "or the connection was lost")
    return bytes(body)


def parse_body(raw: bytes, model: type[M]) -> M:
    """JSON (strict: no NaN, no unpaired surrogates, at most 200 levels deep) into a model."""
    if not raw.strip():
        fail(400, "invalid", "body must be a JSON object; it is empty")
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            fail(400, "malformed_json", f"body nests arrays or objects too deeply: {exc}")
        fail(400, "malformed_json", f"body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        fail(400, "invalid", "body must be a JSON object")
    return validate(model, data)


async def read_json(request: web.Request, model: type[M]) -> M:
    """Read a JSON body of bounded size into a model."""
    return parse_body(await read_body(request), model)


_OWN_HEADERS = frozenset({hdrs.CONTENT_TYPE.lower(), hdrs.CONTENT_LENGTH.lower()})
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large",
          417: "expectation_failed"}


def exception_response(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """An HTTPException, ours or aiohttp's own, as contract JSON with its headers (a 405's
    Allow); closing the connection if the body was not all read, as no next request can be
    found after it."""
    if exc.content_type == "application/json":  # ours, already contract-shaped
        response = web.Response(status=exc.status, text=exc.text,
                                content_type="application/json")
    else:
        response = error_response(exc.status, _CODES.get(exc.status, "http_error"),
                                  f"{request.method} {request.path}: {exc.reason}")
    for key, value in exc.headers.items():
        if key.lower() not in _OWN_HEADERS:
            response.headers.add(key, value)
    body = request.content
    if not body.is_eof() or body.exception() is not None:
        response.force_close()
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error is contract-shaped JSON; an unexpected one is logged, never leaked."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        response = exception_response(request, exc)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = error_response(500, "internal", "internal error; see the router's log")
    if name == "/v1/route":  # what a call waits for, beyond the engine's own microseconds
        metrics.ROUTE_REQUEST_SECONDS.observe(time.perf_counter() - started)
    metrics.child(metrics.HTTP_REQUESTS, name, str(response.status)).inc()
    return response
