"""Small helpers every HTTP handler shares: JSON errors and validated bodies.

Errors follow the contract: 4xx with `{"error": CODE, "message": TEXT, "field"?: NAME}`, and
the middleware makes every error so, aiohttp's own 404/405/413 and unexpected ones alike.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from router.infra import metrics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024  # the EIDO conveyance's subscription limit; ample for one incident


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


class HttpError(web.HTTPException):
    """Raise from a handler to answer with a contract-shaped JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": code, "message": message}
                            | ({"field": field} if field else {})),
            content_type="application/json",
        )


def fail(status: int, code: str, message: str, field: str | None = None) -> NoReturn:
    raise HttpError(status, code, message, field)


def validate(model: type[M], data: Any) -> M:
    """Validate data against a model; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        kind = err["type"]
        message = "unknown field" if kind == "extra_forbidden" else (
            "required field is missing" if kind == "missing" else err["msg"])
        fail(400, "invalid", f"{field}: {message}" if field else message, field)


async def read_json(request: web.Request, model: type[M]) -> M:
    """Parse a JSON body of bounded size into a model."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        fail(413, "too_large", f"body is {request.content_length} bytes; limit {MAX_BODY_BYTES}")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        fail(413, "too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(400, "malformed_json", f"body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        fail(400, "invalid", "body must be a JSON object")
    return validate(model, data)


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
