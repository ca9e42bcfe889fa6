"""Handoffs over MQTT: QoS 1 publish on `{prefix}handoffs/{force}`, acknowledgement on
`{prefix}handoffs/{force}/ack`.

The CAD side answers each message with `{"key": KEY, "status": "accepted" | "duplicate" |
"refused", "reason"?, "reference"?}`. QoS 1 only proves the *broker* has the message, so the
adapter waits for that application-level ack (up to `ack_timeout_s`) before calling it
delivered; the message's `key` is the idempotency key, the same on every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import aiomqtt
from pydantic import Field

from adapters.base import (
    Ack,
    AdapterContext,
    AdapterOptions,
    AdapterUnavailable,
    Delivery,
    Outcome,
    Reconnecting,
    Refusal,
    Replies,
    excerpt,
)

log = logging.getLogger(__name__)


class MqttOptions(AdapterOptions):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = Field(default="overflow/", pattern=r"^[^#+]*/$")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    ack_timeout_s: float = Field(default=5.0, gt=0)


class _Session:
    """One broker connection: the client, and the task routing acks to waiting deliveries."""

    def __init__(self, stack: contextlib.AsyncExitStack, client: aiomqtt.Client):
        self.stack = stack
        self.client = client
        self.replies = Replies()
        self.reader = asyncio.create_task(self._read(), name="mqtt-adapter-acks")

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
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
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            await self.stack.aclose()


class MqttAdapter:
    Options = MqttOptions

    def __init__(self, options: MqttOptions, context: AdapterContext):
        self.options = options
        self.topic = f"{options.prefix}handoffs/{context.force}"
        self._sessions = Reconnecting(self._open)

    async def _open(self) -> _Session:
        opts = self.options
        stack = contextlib.AsyncExitStack()
        client = aiomqtt.Client(opts.host, opts.port, timeout=opts.connect_timeout_s,
                                identifier=f"overflow-handoff-{uuid.uuid4().hex[:12]}")
        try:
            await stack.enter_async_context(client)
            await client.subscribe(self.topic + "/ack", qos=1,
                                   timeout=opts.connect_timeout_s)
        except (aiomqtt.MqttError, OSError) as exc:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await stack.aclose()
            raise AdapterUnavailable(f"MQTT broker {opts.host}:{opts.port}: {exc}") from exc
        return _Session(stack, client)

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
        raise AdapterUnavailable(f"CAD answered {excerpt(repr(status))}")

    async def aclose(self) -> None:
        await self._sessions.close()
