"""The connection layer under the app: what happens before a request reaches a handler.

aiohttp answers a request it cannot parse (a request line or header too long, not HTTP at
all) by itself, in plain text that quotes the offending input, and logs a traceback at ERROR.
Here those answers are the contract's JSON errors, quoting nothing, logged as one DEBUG line
and counted in `overflow_http_requests_total{route="(unparsed)"}`: a flood of junk must not
fill the log nor look like a fault of the router's.

A connection must also complete each request head within `header_timeout_s` of opening or of
its previous response, or it is closed; so an idle keep-alive connection is closed after as
long. (aiohttp's keep-alive timer runs from exactly those two moments and closes a connection
still waiting for a complete head: it is the header timeout, given our bound.) A body, once
the head is in, is bounded by `errors.read_body`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.http.errors import error_response, exception_response
from router.infra import metrics

log = logging.getLogger(__name__)

# Distinct, so that aiohttp's LineTooLong (which reports only the limit it hit) says whether
# the request line (414) or a header (431) was too long. Our longest URL is under 2 KiB.
MAX_REQUEST_LINE = 4096
MAX_HEADER_FIELD = 8190


def protocol_error(exc: HttpProcessingError, line_limit: int) -> tuple[int, str, str]:
    """Status, code and message for a request aiohttp could not parse; nothing of the input."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (line_limit,):
            return 414, "uri_too_long", f"request line longer than {line_limit} bytes"
        return 431, "headers_too_large", f"a header is longer than {exc.args[1]} bytes"
    if exc.message == "Too many headers received":  # aiohttp's words, both of its parsers
        return 431, "headers_too_large", "too many header fields"
    return 400, "bad_request", "request is not valid HTTP/1.1"


class _Connection(RequestHandler):
    """aiohttp's per-connection protocol, answering parse errors in the contract's shape, and
    the HTTP errors raised outside the app's middleware (an unknown `Expect`) too."""

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException):
            resp = exception_response(request, resp)
        return await super().finish_response(request, resp, start_time)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # the app's own failures: aiohttp's way
            return super().handle_error(request, status, exc, message)
        status, code, text = protocol_error(exc, self.max_line_size)
        log.debug("refused a request from %s that is not valid HTTP: %d %s",
                  request.remote, status, code)
        metrics.child(metrics.HTTP_REQUESTS, "(unparsed)", str(status)).inc()
        response = error_response(status, code, text)
        response.force_close()  # the parser has lost its place in the stream
        return response


class _Server(web.Server):
    """Serves the app as `plain` does, with a _Connection per accepted socket."""

    def __init__(self, plain: web.Server, **connection: Any):
        self._loop_of_connections = asyncio.get_running_loop()
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation,
                         loop=self._loop_of_connections, **connection)
        self._connection = connection

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop_of_connections, **self._connection)


class RouterRunner(web.AppRunner):
    """An AppRunner whose connections are _Connection, with the limits above."""

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 access_log: logging.Logger | None, **kwargs: Any):
        self._connection: dict[str, Any] = {
            "access_log": access_log, "keepalive_timeout": header_timeout_s,
            "max_line_size": MAX_REQUEST_LINE, "max_field_size": MAX_HEADER_FIELD}
        super().__init__(app, **kwargs, **self._connection)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app (opens its cleanup contexts)
        return _Server(plain, **self._connection)
