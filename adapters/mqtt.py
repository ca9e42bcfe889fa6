"""Handoffs over MQTT: QoS 1 publish on `{prefix}handoffs/{force}`, acknowledgement on
`{prefix}handoffs/{force}/ack`, dispatchers' answers on `{prefix}handoffs/{force}/answer`.

The CAD side answers each message with `{"key": KEY, "status": "accepted" | "duplicate" |
"refused", "reason"?, "reference"?}`. QoS 1 only proves the *broker* has the message, so the
adapter waits for that application-level ack (up to `ack_timeout_s`) before calling it
delivered; the message's `key` is the idempotency key, the same on every retry.

Later, what a person at the CAD decided is published (QoS 1) on `.../answer`:
`{"handoff_id": KEY, "kind": "acknowledgement" | "completion", "outcome": "accepted" |
"rejected" (acknowledgement) or "completed" | "aborted" (completion), "at"?: ISO 8601 with
zone or epoch seconds, "by"?, "cause"? (required when rejected), "note"?, "reference"?}`,
the fields of `Answer` one for one. Each is passed to the router; the outcome is published
(QoS 1, not retained) on `.../answer/result` as `{"handoff_id", "kind", "result": "recorded"
| "not_found" | "forbidden" | "not_delivered" | "conflict" | "invalid", "message"?}`, so the
CAD learns of a refusal. A malformed answer is logged and counted (`answers_malformed`), never
fatal to the session. `start()` keeps the subscription open between deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import aiomqtt
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
    OUTCOMES,
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

log = logging.getLogger(__name__)


class MqttOptions(AdapterOptions):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = Field(default="overflow/", pattern=r"^[^#+]*/$")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    ack_timeout_s: float = Field(default=5.0, gt=0)


class MqttAnswer(BaseModel):
    """An answer as a CAD publishes it on `.../answer`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handoff_id: uuid.UUID  # the delivery's key (hex), or the same as a UUID
    kind: Literal["acknowledgement", "completion"]
    outcome: Literal["accepted", "rejected", "completed", "aborted"]
    at: AwareDatetime | None = None
    by: AnswerText = ""
    cause: AnswerText = Field(default="", validate_default=True)
    note: AnswerText = ""
    reference: AnswerText = ""

    @field_validator("outcome")
    @classmethod
    def _fits_kind(cls, outcome: str, info: ValidationInfo) -> str:
        kind = str(info.data.get("kind"))
        if kind in OUTCOMES and outcome not in OUTCOMES[kind]:
            raise ValueError(f"an {kind} is one of {' or '.join(OUTCOMES[kind])}")
        return outcome

    @field_validator("cause")
    @classmethod
    def _cause_for_rejection(cls, cause: str, info: ValidationInfo) -> str:
        return cause_given(cause, info.data.get("outcome"))

    def answer(self) -> Answer:
        return Answer(self.handoff_id.hex, self.kind, self.outcome,
                      at=self.at.timestamp() if self.at else None, by=self.by,
                      cause=self.cause, note=self.note, reference=self.reference)


AnswerHandler = Callable[[aiomqtt.Client, bytes | bytearray], Coroutine[Any, Any, None]]


class _Session:
    """One broker connection: the client, and the task routing acks to waiting deliveries
    and answers to the router."""

    def __init__(self, stack: contextlib.AsyncExitStack, client: aiomqtt.Client,
                 answers_topic: str, on_answer: AnswerHandler):
        self.stack = stack
        self.client = client
        self.replies = Replies()
        self.answers_topic = answers_topic
        self.on_answer = on_answer
        self.answering: set[asyncio.Task[None]] = set()
        self.reader = asyncio.create_task(self._read(), name="mqtt-adapter-acks")

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                if message.topic.value == self.answers_topic:
                    # recorded aside: a slow store must not hold up delivery acks
                    payload = message.payload
                    raw = payload if isinstance(payload, bytes | bytearray) else b""
                    task = asyncio.create_task(self.on_answer(self.client, raw))
                    self.answering.add(task)
                    task.add_done_callback(self.answering.discard)
                    continue
                try:
                    ack = json.loads(message.payload)
                except (TypeError, ValueError, RecursionError):
                    log.warning("unreadable handoff ack on %s; ignored", message.topic)
                    continue
                if isinstance(ack, dict):
                    self.replies.answer(str(ack.get("key")), ack)
        except aiomqtt.MqttError as exc:
            log.info("MQTT adapter lost the broker: %s", exc)
        finally:
            self.replies.fail_all(AdapterUnavailable("MQTT connection lost"))

    async def close(self) -> None:
        self.reader.cancel()
        for task in self.answering:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await asyncio.gather(*self.answering, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            await self.stack.aclose()


class MqttAdapter:
    Options = MqttOptions

    def __init__(self, options: MqttOptions, context: AdapterContext):
        self.options = options
        self.context = context
        self.topic = f"{options.prefix}handoffs/{context.force}"
        self._sessions = Reconnecting(self._open)
        self._keeper: asyncio.Task[None] | None = None
        self.answers_malformed = 0  # answers that were not answers: logged, then dropped
        self.answers_refused = 0  # well-formed, but the router would not record them

    async def start(self) -> None:
        """Keep the session, and so the answers subscription, open (Listens)."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(
                self._sessions.keep(f"MQTT broker for {self.context.force}'s answers"),
                name=f"mqtt-keep-{self.context.force}")

    async def _on_answer(self, client: aiomqtt.Client, payload: bytes | bytearray) -> None:
        result: dict[str, Any]
        try:
            message = MqttAnswer.model_validate_json(payload)
        except ValidationError as exc:
            self.answers_malformed += 1
            field, why = first_problem(exc)
            log.warning("malformed answer on %s/answer (%d so far): %s: %s", self.topic,
                        self.answers_malformed, field, excerpt(why, 120))
            result = {"result": "invalid", "message": f"{field}: {why}", "field": field}
            with contextlib.suppress(ValueError, RecursionError):  # echo the ids if any
                raw = json.loads(payload)
                if isinstance(raw, dict):
                    result = {"handoff_id": raw.get("handoff_id"), "kind": raw.get("kind"),
                              **result}
        else:
            result = {"handoff_id": message.handoff_id.hex, "kind": message.kind,
                      "result": "recorded"}
            try:
                await pass_answer(self.context.answer, message.answer())
            except AnswerRefused as exc:
                self.answers_refused += 1
                log.info("answer for %s refused: %s", result["handoff_id"], exc)
                result.update(result=exc.code, message=excerpt(str(exc)))
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(f"{self.topic}/answer/result", json.dumps(result), qos=1,
                                 timeout=self.options.ack_timeout_s)

    async def _open(self) -> _Session:
        opts = self.options
        stack = contextlib.AsyncExitStack()
        client = aiomqtt.Client(opts.host, opts.port, timeout=opts.connect_timeout_s,
                                identifier=f"overflow-handoff-{uuid.uuid4().hex[:12]}")
        try:
            await stack.enter_async_context(client)
            await client.subscribe(self.topic + "/ack", qos=1,
                                   timeout=opts.connect_timeout_s)
            await client.subscribe(self.topic + "/answer", qos=1,
                                   timeout=opts.connect_timeout_s)
        except (aiomqtt.MqttError, OSError) as exc:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await stack.aclose()
            raise AdapterUnavailable(f"MQTT broker {opts.host}:{opts.port}: {exc}") from exc
        return _Session(stack, client, self.topic + "/answer", self._on_answer)

    async def deliver(self, delivery: Delivery) -> Outcome:
        session = await self._sessions.get()
        done = session.replies.expect(delivery.key)
        payload = json.dumps({"key": delivery.key, "incident": dict(delivery.incident)})
        try:
            await session.client.publish(self.topic, payload, qos=1,
                                         timeout=self.options.ack_timeout_s)
            async with asyncio.timeout(self.options.ack_timeout_s):
                ack = await done
        except aiomqtt.MqttError as exc:
            raise AdapterUnavailable(f"MQTT publish failed: {exc}") from exc
        except TimeoutError as exc:
            raise AdapterUnavailable(
                f"no ack on {self.topic}/ack within {self.options.ack_timeout_s}s") from exc
        finally:
            session.replies.forget(delivery.key)
        status = ack.get("status")
        if status in ("accepted", "duplicate"):
            return Ack(reference=excerpt(str(ack.get("reference") or "")),
                       duplicate=status == "duplicate")
        if status == "refused":
            return Refusal(excerpt(str(ack.get("reason") or "refused by the CAD")))
        raise Deferred(f"CAD answered {excerpt(repr(status))}")

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        await self._sessions.close()
