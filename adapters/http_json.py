"""EIDO-style JSON over HTTPS: one POST per attempt, acknowledged in the response.

The request carries `Idempotency-Key` (the same for every retry) and is authenticated with a
bearer token or an HMAC-SHA256 signature over `timestamp.body` (`X-Overflow-Timestamp`,
`X-Overflow-Signature: sha256=HEX`), the scheme webhook senders such as Stripe and GitHub use,
so the CAD can reject replays and tampering without TLS client certificates.

Answers: 2xx acknowledged (`{"reference"?, "duplicate"?}` in the body); 409 already have it
(acknowledged as a duplicate); 408, 425, 429 and 5xx try again; any other 4xx is a permanent
refusal whose reason is the body's `message` (or its text). The status decides: a body that is
not JSON, or not even UTF-8, changes no outcome (a 2xx with a garbled body is still delivered),
it only yields no reference.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any, Literal

import aiohttp
from pydantic import Field, model_validator

from adapters.base import (
    Ack,
    AdapterContext,
    AdapterOptions,
    AdapterUnavailable,
    Deferred,
    Delivery,
    Outcome,
    Refusal,
    excerpt,
)
from adapters.eido import eido_document

RETRYABLE_4XX = frozenset({408, 425, 429})
MAX_ANSWER_BYTES = 64 * 1024  # of a CAD's answer read; the rest is not needed


class HttpJsonOptions(AdapterOptions):
    url: str = Field(pattern=r"^https?://")
    auth: Literal["none", "bearer", "hmac"] = "none"
    secret_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    format: Literal["eido", "incident"] = "eido"  # EIDO document, or the contract JSON as is
    timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _secret(self) -> HttpJsonOptions:
        if self.auth != "none" and not self.secret_env:
            raise ValueError(f"auth {self.auth!r} needs secret_env (the variable holding it)")
        return self


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The value of X-Overflow-Signature; the CAD recomputes it to verify."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class HttpJsonAdapter:
    Options = HttpJsonOptions

    def __init__(self, options: HttpJsonOptions, context: AdapterContext):
        self.options = options
        self.context = context
        self._session: aiohttp.ClientSession | None = None

    def _secret(self) -> bytes:
        # read at use, not at start: a rotated secret takes effect without a restart
        value = os.environ.get(self.options.secret_env or "", "")
        if not value:
            raise AdapterUnavailable(f"{self.options.secret_env} is not set")
        return value.encode()

    def _headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": delivery.key}
        if self.options.auth == "bearer":
            headers["Authorization"] = "Bearer " + self._secret().decode()
        elif self.options.auth == "hmac":
            stamp = str(int(time.time()))
            headers["X-Overflow-Timestamp"] = stamp
            headers["X-Overflow-Signature"] = signature(self._secret(), stamp, body)
        return headers

    async def deliver(self, delivery: Delivery) -> Outcome:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.options.timeout_s))
        doc = (eido_document(delivery) if self.options.format == "eido"
               else dict(delivery.incident))
        body = json.dumps(doc).encode()
        try:
            async with self._session.post(self.options.url, data=body,
                                          headers=self._headers(delivery, body)) as resp:
                raw = await _read_bounded(resp)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdapterUnavailable(f"POST {self.options.url}: "
                                     f"{exc or type(exc).__name__}") from exc
        answer = _json(raw)
        reference = excerpt(str(answer.get("reference") or ""))
        if 200 <= status < 300:
            return Ack(reference=reference, duplicate=answer.get("duplicate") is True)
        if status == 409:
            return Ack(reference=reference, duplicate=True)
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            message = answer.get("message")
            reason = message if isinstance(message, str) and message else raw
            return Refusal(f"HTTP {status}: {excerpt(reason)}")
        raise Deferred(f"HTTP {status}: {excerpt(raw)}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def _json(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or {} when it is not one (JSON is optional)."""
    text = raw.decode("utf-8-sig", "replace")
    try:  # strict=False: raw control characters inside strings are let through
        data = json.loads(text, strict=False) if text.strip() else {}
    except (ValueError, RecursionError):  # not JSON; or nested deeper than the parser goes
        return {}
    return data if isinstance(data, dict) else {}
