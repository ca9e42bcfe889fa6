"""UCRI2 `incident_transfer_police` over HTTP: the transfer out, the dispatcher's answers back.

Modelled on the public UCRI2 specification (github.com/PMeV-EFUL/ucri2,
`apps/incident_transfer_police/1.0`), so a German-style CAD, or a UK one of the same shape,
plugs in. The sending side A (the router, for the force that took the call) transfers an
incident to B (the destination CAD); a dispatcher at B answers with an `acknowledgement`
(`accepted` or `rejected`, with a cause) and later, optionally, a `completion`
(`completed_sucessfully` [sic, the 1.0 schema's spelling] or `aborted`). Each message travels
in a UCRI2-style envelope (the CRM's `envelope`/`payload`, without routing or signature):

    {"messageId": UUID, "sentDate": ISO 8601, "source": SOURCE, "tags": [...],
     "payload": {"schemaId": "incident" | "acknowledgement" | "completion" | "handoff_status",
                 "schemaVersion": "1.0", "contentType": "application/json", "data": {...}}}

`data` is sent as a JSON object; inbound it may also be JSON text, as UCRI2's CRM carries it.
The shared incident id is the handoff id written as a UUID (`sharedIncidentId`).

Transfer (`deliver`: POST `url`, one attempt, `Idempotency-Key` = handoff id, bearer from
`secret_env` when set), `data` from the contract's incident:

    sharedIncidentId       handoff id as UUID         startTimestamp   opened_at
    internalId             incident_id                sentByDispatcherAt  now
    classifications        [category]                 issue            summary
    flashingLights         priority == P1             informers        [{name, phone}] (caller)
    missionLocation        coordinate {lat, lon}; address {street: the one-line address}
    additionalInformation  "P1 999 call C, handed from met to kent"
    envelope tags          from:F, to:F, priority:P, incident:ID

A caller with no name is sent as "unknown" (UCRI2 requires a person's name). Answers: 2xx
delivered (reference: the body's `reference` or `internalId`), 409 delivered before
(duplicate), 408/425/429/5xx/timeout try again, any other 4xx a refusal.

Answers in: the adapter's own listener (`listen_host`:`listen_port`, `POST /ucri2`, the same
bearer) takes envelopes whose `schemaId` is

    acknowledgement  sharedIncidentId → handoff_id; status accepted|rejected → outcome;
                     acknowledgedByDispatcherAt → at; cause → cause (required if rejected);
                     extensions: dispatcher → by, incidentReference → reference
    completion       sharedIncidentId → handoff_id; status completed_sucessfully (or
                     completed_successfully) → completed, aborted → aborted; completedAt → at;
                     additionalInformation → note; extension: incidentReference → reference

and answers 200 `{"result": "recorded"}` once the router has recorded it; 400
`{"error": "invalid", "message", "field"}` naming the field at fault; 401 without the bearer;
404, 403, 409, 400 when the router refuses it (unknown handoff, not sent to this force, not yet
delivered or contradicting an earlier answer, invalid). Timestamps must carry a zone.

Updates to the sending force's CAD (`update`: POST `status_url`, when set): `acknowledged` and
`rejected` as an `acknowledgement`, `completed` as a `completion` (what that CAD would have
heard from B directly); `delivered`, `escalated`, `failed` as `handoff_status`
`{sharedIncidentId, status, statusAt, cause?, incidentReference?}`, an extension: UCRI2 has
no message for them. A 4xx is logged and dropped (sending it again will not help).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp
from aiohttp import web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.base import (
    REFUSAL_STATUS,
    Ack,
    AdapterContext,
    AdapterOptions,
    AdapterUnavailable,
    Answer,
    AnswerRefused,
    AnswerText,
    Deferred,
    Delivery,
    Outcome,
    Refusal,
    cause_given,
    excerpt,
    first_problem,
    pass_answer,
)
from adapters.http_json import RETRYABLE_4XX, _json, _read_bounded
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"
PATH = "/ucri2"
MAX_BODY_BYTES = 64 * 1024  # an answer is a few hundred bytes


class Ucri2Options(AdapterOptions):
    url: str = Field(pattern=r"^https?://")  # where the CAD takes transfers
    status_url: str | None = Field(default=None, pattern=r"^https?://")  # this force's own
    secret_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=0, ge=0, le=65535)  # 0: take no answers
    timeout_s: float = Field(default=5.0, gt=0)
    source: str = Field(default="overflow-router", min_length=1, max_length=200)
    completed_status: Literal["completed_sucessfully", "completed_successfully"] = (
        "completed_sucessfully")  # as sent in updates; the published 1.0 schema's spelling

    @model_validator(mode="after")
    def _listener_needs_secret(self) -> Ucri2Options:
        if self.listen_port and not self.secret_env:
            raise ValueError("listen_port needs secret_env: answers are taken only from a CAD "
                             "that holds the shared secret")
        return self


# ---- inbound messages ------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Acknowledgement(_Strict):
    sharedIncidentId: uuid.UUID
    acknowledgedByDispatcherAt: AwareDatetime
    status: Literal["accepted", "rejected"]
    cause: AnswerText = Field(default="", validate_default=True)
    dispatcher: AnswerText = ""  # extension: UCRI2 1.0 does not say who
    incidentReference: AnswerText = ""  # extension: B's own incident number

    @field_validator("cause")
    @classmethod
    def _cause_for_rejection(cls, cause: str, info: ValidationInfo) -> str:
        return cause_given(cause, info.data.get("status"))


class Completion(_Strict):
    sharedIncidentId: uuid.UUID
    completedAt: AwareDatetime
    status: Literal["completed_sucessfully", "completed_successfully", "aborted"]
    additionalInformation: AnswerText = ""
    incidentReference: AnswerText = ""


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True)

    schemaId: Literal["acknowledgement", "completion"]
    schemaVersion: str = Field(default=SCHEMA_VERSION, max_length=20)
    contentType: Literal["application/json"] = "application/json"

    @field_validator("data", mode="before", check_fields=False)
    @classmethod
    def _decoded(cls, data: Any) -> Any:
        """UCRI2's CRM carries `data` as text; a JSON object is taken as well."""
        if isinstance(data, str | bytes):
            try:
                return json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise ValueError("data is not JSON") from exc
        return data


class _AckPayload(_Payload):
    data: Acknowledgement


class _CompletionPayload(_Payload):
    data: Completion


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True)  # routing fields a CRM adds are let through

    messageId: uuid.UUID | None = None
    payload: _Payload


class _AckEnvelope(_Envelope):
    payload: _AckPayload


class _CompletionEnvelope(_Envelope):
    payload: _CompletionPayload


def parse_answer(body: Any) -> Answer:
    """A UCRI2 acknowledgement or completion envelope as an Answer; raises ValidationError
    naming the field (`payload.data.cause`)."""
    kind = _Envelope.model_validate(body).payload.schemaId  # which message, then all of it
    if kind == "acknowledgement":
        ack = _AckEnvelope.model_validate(body).payload.data
        return Answer(ack.sharedIncidentId.hex, "acknowledgement", ack.status,
                      at=ack.acknowledgedByDispatcherAt.timestamp(), by=ack.dispatcher,
                      cause=ack.cause, reference=ack.incidentReference)
    done = _CompletionEnvelope.model_validate(body).payload.data
    return Answer(done.sharedIncidentId.hex, "completion",
                  "aborted" if done.status == "aborted" else "completed",
                  at=done.completedAt.timestamp(), note=done.additionalInformation,
                  reference=done.incidentReference)


# ---- outbound messages -----------------------------------------------------------------


def shared_incident_id(handoff_id: str) -> str:
    return str(uuid.UUID(hex=handoff_id))


def envelope(schema_id: str, data: Mapping[str, Any], source: str,
             tags: list[str]) -> dict[str, Any]:
    return {"messageId": str(uuid.uuid4()), "sentDate": iso(time.time()), "source": source,
            "tags": tags, "payload": {"schemaId": schema_id, "schemaVersion": SCHEMA_VERSION,
                                      "contentType": "application/json", "data": dict(data)}}


def _tags(message: Mapping[str, Any]) -> list[str]:
    return [f"{name}:{message[key]}" for name, key in (
        ("from", "from"), ("to", "to"), ("priority", "priority"), ("incident", "incident_id"))
        if message.get(key)]


def transfer_message(delivery: Delivery, source: str) -> dict[str, Any]:
    """The UCRI2 `incident` message for one handoff (mapping in the module docstring)."""
    inc = delivery.incident
    where = inc.get("location") or {}
    location: dict[str, Any] = {}
    if where.get("lat") is not None:
        location["coordinate"] = {"lat": where["lat"], "lon": where["lon"]}
    if where.get("address"):
        location["address"] = {"street": where["address"]}
    data: dict[str, Any] = {
        "sharedIncidentId": shared_incident_id(delivery.key),
        "internalId": inc["incident_id"],
        "sentByDispatcherAt": iso(time.time()),
        "startTimestamp": inc["opened_at"],
        "classifications": [inc["category"]],
        "issue": inc["summary"],
        "flashingLights": inc["priority"] == "P1",
        "missionLocation": location,
        "additionalInformation": (f"{inc['priority']} {inc['service']} call"
                                  f"{' ' + inc['call_id'] if inc.get('call_id') else ''}, "
                                  f"handed from {inc['from']} to {inc['to']}"),
    }
    caller = inc.get("caller") or {}
    if caller:
        person = {"name": caller.get("name") or "unknown"}
        if caller.get("phone"):
            person["phone"] = caller["phone"]
        data["informers"] = [person]
    return envelope("incident", data, source, _tags(inc))


def status_message(status: Mapping[str, Any], completed_status: str,
                   source: str) -> dict[str, Any]:
    """What the sending force's CAD hears of one transition (module docstring)."""
    shared = shared_incident_id(str(status["handoff_id"]))
    what, at = status["status"], status["at"]
    optional = {k: str(status[src]) for k, src in (("cause", "cause"),
                                                    ("incidentReference", "reference"))
                if status.get(src)}
    if what in ("acknowledged", "rejected"):
        data = {"sharedIncidentId": shared, "acknowledgedByDispatcherAt": at,
                "status": "accepted" if what == "acknowledged" else "rejected", **optional}
        if status.get("by"):
            data["dispatcher"] = str(status["by"])
        return envelope("acknowledgement", data, source, _tags(status))
    if what == "completed":
        data = {"sharedIncidentId": shared, "completedAt": at,
                "status": "aborted" if status.get("outcome") == "aborted" else completed_status}
        if status.get("note"):
            data["additionalInformation"] = str(status["note"])
        if "incidentReference" in optional:
            data["incidentReference"] = optional["incidentReference"]
        return envelope("completion", data, source, _tags(status))
    return envelope("handoff_status", {"sharedIncidentId": shared, "status": what,
                                       "statusAt": at, **optional}, source, _tags(status))


# ---- the adapter -----------------------------------------------------------------------


def _error(status: int, error: str, message: str, field: str | None = None) -> web.Response:
    body = {"error": error, "message": message, **({"field": field} if field else {})}
    return web.json_response(body, status=status)


class Ucri2Adapter:
    Options = Ucri2Options

    def __init__(self, options: Ucri2Options, context: AdapterContext):
        self.options = options
        self.context = context
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._rebind: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._closed = False

    # -- the listener: opened by `start` (or the first delivery), closed by `aclose`

    async def start(self) -> None:
        async with self._starting:
            if (not self.options.listen_port or self._closed or self._runner is not None
                    or self._rebind is not None):
                return
            if not await self._bind():
                self._rebind = asyncio.create_task(self._bind_until_bound(),
                                                   name=f"ucri2-listen-{self.context.force}")

    async def _bind(self) -> bool:
        opts = self.options
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(PATH, self._receive)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=opts.timeout_s)
        await runner.setup()
        try:
            await web.TCPSite(runner, opts.listen_host, opts.listen_port).start()
        except OSError as exc:
            await runner.cleanup()
            log.warning("UCRI2 listener for %s cannot listen on %s:%s: %s",
                        self.context.force, opts.listen_host, opts.listen_port, exc)
            return False
        self._runner = runner
        return True

    async def _bind_until_bound(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            if await self._bind():
                break
        log.info("UCRI2 listener for %s is listening", self.context.force)

    def _secret(self) -> str:
        # read at use: a rotated secret takes effect without a restart
        return os.environ.get(self.options.secret_env or "", "")

    def _authorised(self, request: web.Request) -> bool:
        secret = self._secret()
        given = request.headers.get("Authorization", "")
        return bool(secret) and hmac.compare_digest(given.encode(),
                                                    f"Bearer {secret}".encode())

    async def _receive(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "unauthorised", "a valid bearer token is required")
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"at most {MAX_BODY_BYTES} bytes")
        except (ValueError, RecursionError):
            return _error(400, "invalid", "the body is not JSON")
        try:
            answer = parse_answer(body)
        except ValidationError as exc:
            field, message = first_problem(exc)
            return _error(400, "invalid", f"{field}: {message}", field)
        try:
            await pass_answer(self.context.answer, answer)
        except AnswerRefused as exc:
            return _error(REFUSAL_STATUS.get(exc.code, 400), exc.code, excerpt(str(exc)))
        return web.json_response({"result": "recorded",
                                  "sharedIncidentId": shared_incident_id(answer.handoff_id)})

    # -- outbound

    async def _post(self, url: str, message: Mapping[str, Any], key: str) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.options.timeout_s))
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        if self.options.secret_env:
            secret = self._secret()
            if not secret:
                raise AdapterUnavailable(f"{self.options.secret_env} is not set")
            headers["Authorization"] = f"Bearer {secret}"
        try:
            async with self._session.post(url, data=json.dumps(message).encode(),
                                          headers=headers) as resp:
                return resp.status, await _read_bounded(resp)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdapterUnavailable(f"POST {url}: {exc or type(exc).__name__}") from exc

    async def deliver(self, delivery: Delivery) -> Outcome:
        await self.start()  # answers to this handoff must find the listener open
        status, raw = await self._post(self.options.url,
                                       transfer_message(delivery, self.options.source),
                                       delivery.key)
        answer = _json(raw)
        reference = excerpt(str(answer.get("reference") or answer.get("internalId") or ""))
        if 200 <= status < 300:
            return Ack(reference=reference, duplicate=answer.get("duplicate") is True)
        if status == 409:
            return Ack(reference=reference, duplicate=True)
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            message = answer.get("message") or answer.get("cause")
            reason = message if isinstance(message, str) and message else raw
            return Refusal(f"UCRI2 transfer HTTP {status}: {excerpt(reason)}")
        raise Deferred(f"UCRI2 transfer HTTP {status}: {excerpt(raw)}")

    async def update(self, status: Mapping[str, Any]) -> None:
        """Tell this force's CAD how a handoff it sent is going (Updates protocol)."""
        if not self.options.status_url:
            return
        message = status_message(status, self.options.completed_status, self.options.source)
        code, raw = await self._post(self.options.status_url, message,
                                     f"{status['handoff_id']}:{status['status']}")
        if 200 <= code < 300:
            return
        if 400 <= code < 500 and code not in RETRYABLE_4XX:
            log.warning("UCRI2 status for %s refused by %s's CAD: HTTP %s %s",
                        status["handoff_id"], self.context.force, code, excerpt(raw, 120))
            return
        raise AdapterUnavailable(f"UCRI2 status HTTP {code}: {excerpt(raw)}")

    async def aclose(self) -> None:
        self._closed = True
        if self._rebind is not None:
            self._rebind.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebind
            self._rebind = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
