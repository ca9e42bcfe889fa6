"""EIDO over the NENA-STA-024 WebSocket conveyance.

Roles follow STA-024: the destination CAD is the *subscriber*, the router the *notifier*.
The transport is turned round because a control room's CAD accepts connections rather than
dialling out to every partner: the router connects (aiohttp WebSocket client) to the CAD's
conveyance URL, the CAD sends `subscribe`, the router answers `subscribeResponse` with a
subscription id, then sends each incident as an `event` carrying one EIDO in `notification`,
and the CAD answers `eventResponse` with the same `transactionId` and a `statusCode`
(2xx acknowledged, 4xx refused for good, 5xx try again). WebSocket pings keep the link alive
and notice a dead peer (aiohttp's `heartbeat`). The status code decides: whatever else the CAD
says (a garbled `statusText`, an odd reference, a binary frame that is not UTF-8) changes no
outcome, and an answer without a readable `statusCode` is worth another attempt.

The transaction id is the handoff's idempotency key, so a CAD that sees a retry can tell.
`eido_document` is also used by the http_json adapter.

Answers from people (an extension of ours: STA-024 carries no dispatcher's decision). Later, on
the same conveyance, the CAD sends an `incidentStatus` naming the handoff by the
`transactionId` of its event:

    {"incidentStatus": {"requestId": R, "transactionId": KEY, "status": S,
                        "statusTimestamp": ISO 8601 with zone, "agentIdentifier": WHO,
                        "reasonText": WHY, "noteText": NOTE, "incidentReference": REF}}

`status` `accepted` or `rejected` is the dispatcher's acknowledgement (`reasonText` required
when rejected), `completed` or `aborted` the completion; `agentIdentifier` → by,
`statusTimestamp` → at (absent: when received), `reasonText` → cause, `noteText` → note,
`incidentReference` → reference. The router answers `incidentStatusResponse` with the same
`requestId` and `transactionId` and a `statusCode`: 200 recorded, 400 malformed (`statusText`
names the field), 404 unknown handoff, 403 not sent to this CAD, 409 not yet delivered or
contradicting an earlier answer. `start()` keeps the conveyance open between deliveries, so
answers to handoffs sent before a restart are still heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import aiohttp
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
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
    Reconnecting,
    Refusal,
    Replies,
    cause_given,
    excerpt,
    first_problem,
    pass_answer,
)
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

SUBPROTOCOL = "emergency-incident-data-object"
PRIORITY_NUMBER = {"P1": 1, "P2": 2, "P3": 3, "P4": 4}


def _now() -> str:
    return iso(time.time())


def eido_document(delivery: Delivery, sender: str = "overflow-router") -> dict[str, Any]:
    """An EIDO (NENA-STA-021 component names) for one handoff. Every component has its `$id`
    and `lastUpdateTimestamp`; the original incident rides along unchanged in `extension`, so
    nothing is lost in translation."""
    inc = delivery.incident
    now = _now()
    ref = f"urn:emergency:uid:incidentid:{delivery.key}:{inc['from']}"

    def component(kind: str, **fields: Any) -> dict[str, Any]:
        return {"$id": f"{kind}-{delivery.key}", "lastUpdateTimestamp": now,
                "updatedByAgencyReference": inc["from"], **fields}

    location = inc.get("location") or {}
    by_value = {k: v for k, v in (("latitude", location.get("lat")),
                                  ("longitude", location.get("lon")),
                                  ("civicAddressText", location.get("address"))) if v is not None}
    caller = inc.get("caller") or {}
    doc: dict[str, Any] = {
        "$id": f"eido-{delivery.key}",
        "eidoMessageIdentifier": f"urn:emergency:uid:eidomessage:{uuid.uuid4()}:{sender}",
        "lastUpdateTimestamp": now,
        "sendingSystemIdentifier": sender,
        "incidentComponent": component(
            "incident", incidentTrackingIdentifier=ref,
            localIncidentIdentifier=inc["incident_id"],
            incidentTypeCommonRegistryText=[inc["category"]],
            incidentCommonPriorityNumber=PRIORITY_NUMBER.get(inc["priority"], 4),
            incidentStatusCommonRegistryText=["Transferred"],
            incidentCreationTimestamp=inc["opened_at"]),
        "locationComponent": [component("location", locationByValue=by_value)],
        "callComponent": [component("call", callTypeDescriptionText=inc["service"],
                                    **({"callIdentifier": inc["call_id"]}
                                       if inc.get("call_id") else {}))],
        "notesComponent": [component("note", noteText=inc["summary"])],
        "agencyComponent": [component("agency-from", agencyIdentifier=inc["from"],
                                      agencyRoleText="Transferring"),
                            component("agency-to", agencyIdentifier=inc["to"],
                                      agencyRoleText="Receiving")],
        "extension": {"overflowRouter": {"handoffId": delivery.key, "incident": dict(inc)}},
    }
    if caller:
        doc["personComponent"] = [component("caller", personNameText=caller.get("name", ""),
                                            contactPhoneNumber=caller.get("phone", ""),
                                            personRoleText="Caller")]
    return doc


class IncidentStatus(BaseModel):
    """A CAD's `incidentStatus`: what a person there decided about a handoff."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # CADs may say more; it is unused

    transactionId: uuid.UUID  # the event's: the handoff id
    status: Literal["accepted", "rejected", "completed", "aborted"]
    statusTimestamp: AwareDatetime | None = None
    agentIdentifier: AnswerText = ""
    reasonText: AnswerText = Field(default="", validate_default=True)
    noteText: AnswerText = ""
    incidentReference: AnswerText = ""

    @field_validator("reasonText")
    @classmethod
    def _reason_for_rejection(cls, reason: str, info: ValidationInfo) -> str:
        return cause_given(reason, info.data.get("status"), "reasonText")

    def answer(self) -> Answer:
        kind: Literal["acknowledgement", "completion"] = (
            "acknowledgement" if self.status in ("accepted", "rejected") else "completion")
        return Answer(self.transactionId.hex, kind, self.status,
                      at=self.statusTimestamp.timestamp() if self.statusTimestamp else None,
                      by=self.agentIdentifier, cause=self.reasonText, note=self.noteText,
                      reference=self.incidentReference)


StatusHandler = Callable[[Any], Awaitable[Mapping[str, Any]]]


class EidoOptions(AdapterOptions):
    url: str = Field(pattern=r"^wss?://")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    subscribe_timeout_s: float = Field(default=5.0, gt=0)  # the CAD must subscribe by then
    heartbeat_s: float = Field(default=10.0, gt=0)
    sender: str = "overflow-router"


class _Link:
    """One live WebSocket with a subscription: sends events, matches eventResponses."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 subscription_id: str, on_status: StatusHandler):
        self.session = session
        self.ws = ws
        self.subscription_id = subscription_id
        self.replies = Replies()
        self.on_status = on_status
        self.answering: set[asyncio.Task[None]] = set()  # incidentStatus being recorded
        self.reader = asyncio.create_task(self._read(), name="eido-reader")

    @property
    def alive(self) -> bool:
        return not self.ws.closed and not self.reader.done()

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    continue
                # tolerant: a binary frame is read as (possibly broken) UTF-8 text, and raw
                # control characters inside strings are let through
                text = (msg.data if isinstance(msg.data, str)
                        else msg.data.decode("utf-8", "replace"))
                try:
                    data = json.loads(text, strict=False)
                except (ValueError, RecursionError):
                    log.warning("EIDO peer sent non-JSON; ignored")
                    continue
                response = data.get("eventResponse") if isinstance(data, dict) else None
                if isinstance(response, dict):
                    self.replies.answer(str(response.get("transactionId")), response)
                elif isinstance(data, dict) and "subscribe" in data:
                    await self._answer_subscribe(data["subscribe"])
                elif isinstance(data, dict) and "incidentStatus" in data:
                    # recorded aside: a slow store must not hold up eventResponses
                    task = asyncio.create_task(self._answer_status(data["incidentStatus"]))
                    self.answering.add(task)
                    task.add_done_callback(self.answering.discard)
        finally:
            self.replies.fail_all(AdapterUnavailable("EIDO WebSocket closed"))

    async def _answer_subscribe(self, request: Any) -> None:
        """A re-subscribe on a live link keeps the same subscription."""
        request_id = request.get("requestId") if isinstance(request, dict) else None
        await self.ws.send_json({"subscribeResponse": {
            "requestId": request_id, "subscriptionId": self.subscription_id,
            "statusCode": 200, "statusText": "OK"}})

    async def _answer_status(self, request: Any) -> None:
        reply = await self.on_status(request)
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await self.ws.send_json({"incidentStatusResponse": dict(reply)})

    async def event(self, transaction_id: str, eido: Mapping[str, Any]) -> Mapping[str, Any]:
        done = self.replies.expect(transaction_id)
        try:
            await self.ws.send_json({"event": {"subscriptionId": self.subscription_id,
                                               "transactionId": transaction_id,
                                               "notification": [eido]}})
            return await done
        finally:
            self.replies.forget(transaction_id)

    async def close(self) -> None:
        self.reader.cancel()
        for task in self.answering:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await asyncio.gather(*self.answering, return_exceptions=True)
        await self.ws.close()
        await self.session.close()


class EidoAdapter:
    Options = EidoOptions

    def __init__(self, options: EidoOptions, context: AdapterContext):
        self.options = options
        self.context = context
        self._links = Reconnecting(self._open)
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Keep the conveyance open between deliveries: answers arrive on it (Listens)."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(
                self._links.keep(f"EIDO conveyance of {self.context.force}"),
                name=f"eido-keep-{self.context.force}")

    async def _on_status(self, request: Any) -> Mapping[str, Any]:
        """Record one incidentStatus; what to answer the CAD."""
        ids = request if isinstance(request, dict) else {}
        reply: dict[str, Any] = {"requestId": ids.get("requestId"),
                                 "transactionId": ids.get("transactionId")}
        try:
            answer = IncidentStatus.model_validate(request).answer()
        except ValidationError as exc:
            field, message = first_problem(exc)
            return {**reply, "statusCode": 400, "statusText": f"{field}: {message}"}
        try:
            await pass_answer(self.context.answer, answer)
        except AnswerRefused as exc:
            return {**reply, "statusCode": REFUSAL_STATUS.get(exc.code, 400),
                    "statusText": excerpt(str(exc))}
        return {**reply, "statusCode": 200, "statusText": "OK"}

    async def _open(self) -> _Link:
        opts = self.options
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=opts.connect_timeout_s))
        try:
            ws = await session.ws_connect(opts.url, protocols=(SUBPROTOCOL,),
                                          heartbeat=opts.heartbeat_s,
                                          timeout=aiohttp.ClientWSTimeout(
                                              ws_close=opts.connect_timeout_s))
            async with asyncio.timeout(opts.subscribe_timeout_s):
                request = await ws.receive_json()
            sub = request.get("subscribe") if isinstance(request, dict) else None
            if not isinstance(sub, dict):
                await ws.close()
                raise AdapterUnavailable(f"EIDO peer did not subscribe (sent {request!r:.80})")
            link = _Link(session, ws, f"sub-{uuid.uuid4()}", self._on_status)
            await link._answer_subscribe(sub)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            await session.close()
            raise AdapterUnavailable(f"cannot open EIDO conveyance to {opts.url}: "
                                     f"{exc or type(exc).__name__}") from exc
        except BaseException:
            await session.close()
            raise
        return link

    async def deliver(self, delivery: Delivery) -> Outcome:
        link = await self._links.get()
        try:
            response = await link.event(delivery.key,
                                        eido_document(delivery, self.options.sender))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise AdapterUnavailable(f"EIDO send failed: {exc}") from exc
        code = _status_code(response.get("statusCode"))
        text = excerpt(str(response.get("statusText") or ""))
        if code is None:
            raise AdapterUnavailable(f"EIDO eventResponse without a statusCode {text}".strip())
        if 200 <= code < 300:
            return Ack(reference=excerpt(str(response.get("incidentReference") or "")),
                       duplicate=code == 208)
        if 400 <= code < 500 and code not in (408, 429):
            return Refusal(f"EIDO eventResponse {code} {text}".strip())
        raise Deferred(f"EIDO eventResponse {code} {text}".strip())

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        await self._links.close()


def _status_code(value: Any) -> int | None:
    """An eventResponse's statusCode as a number (some CADs send "200"), or None."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None
