"""The router's one MQTT connection: reconnects by itself, never blocks a caller.

`publish` only queues (retained state and alerts must not wait on a broker that may be gone);
`run` connects, subscribes every registered pattern, sends the queue and dispatches messages,
and on any loss reconnects with exponential backoff and jitter (tenacity). Topics are given
relative to the configured prefix (`state/met` → `overflow/state/met`). `reconfigure` (a config
reload) moves the link to new broker settings by reconnecting. With `mqtt.tls` the link speaks
TLS 1.2 or later, checks the broker's certificate and name, and may present its own; a reload
rereads those files, for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from router.config import Mqtt
from router.config.schema import MqttTls
from router.infra.listeners import Listeners, Unsubscribe

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]  # (topic relative to the prefix, payload)
ConnectionListener = Callable[[bool], None]

CONNECT_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 5.0
KEEPALIVE_S = 10  # a silent broker is noticed within 1.5 times this
SEND_RETRY_S = 0.5
QUEUE_LIMIT = 10_000  # while disconnected; the oldest are dropped first


class Reconfigured(aiomqtt.MqttError):
    """Ends a connection on purpose: the settings changed, the next one uses them."""


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str  # relative to the prefix in force when it is sent
    payload: bytes
    qos: int
    retain: bool


class MqttLink:
    def __init__(self, settings: Mqtt, *, environ: Mapping[str, str] = os.environ,
                 client_id: str | None = None, backoff_max_s: float = 5.0):
        self._apply(settings, environ)
        self._client_id = client_id
        self._backoff_max_s = backoff_max_s
        self._handlers: list[tuple[str, Handler]] = []
        self._listeners: Listeners[bool] = Listeners()
        self._queue: deque[_Outgoing] = deque(maxlen=QUEUE_LIMIT)
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # set by reconfigure: reconnect with the new settings
        self._client: aiomqtt.Client | None = None
        self.connected = False
        self.connections = 0  # successful connects so far (tests and status read it)
        self.dropped = 0  # messages dropped because the queue was full while disconnected

    def _apply(self, settings: Mqtt, environ: Mapping[str, str]) -> None:
        tls = _tls_context(settings.tls) if settings.tls is not None else None  # may raise
        self.settings = settings
        self._tls = tls
        self.prefix = settings.prefix
        self._username = environ.get(settings.username_env) if settings.username_env else None
        self._password = environ.get(settings.password_env) if settings.password_env else None

    # ---- used by the rest of the router (no awaiting) -----------------------------------

    def reconfigure(self, settings: Mqtt, environ: Mapping[str, str] = os.environ) -> bool:
        """Take new broker settings (host, port, credentials, prefix); True if they differ.
        The link reconnects with them at once; queued messages go to the new broker."""
        before = (self.settings, self._username, self._password)
        try:
            self._apply(settings, environ)
        except (OSError, ValueError) as exc:  # files changed since the config was validated
            log.error("MQTT TLS files cannot be loaded (%s); keeping the running settings", exc)
            return False
        if (self.settings, self._username, self._password) == before:
            return False
        log.info("MQTT settings changed: moving to %s:%d", settings.host, settings.port)
        self._changed.set()
        return True

    def subscribe(self, pattern: str, handler: Handler) -> Unsubscribe:
        """Register before or while running; applied on every (re)connection. The returned
        function stops the handler being called (the broker subscription ends at reconnect)."""
        entry = (pattern, handler)
        self._handlers.append(entry)
        if self._client is not None and self.connected:
            client = self._client
            task = asyncio.get_running_loop().create_task(
                client.subscribe(self.prefix + pattern, timeout=PUBLISH_TIMEOUT_S))
            task.add_done_callback(_log_failure)

        def unsubscribe() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return unsubscribe

    def add_connection_listener(self, listener: ConnectionListener) -> Unsubscribe:
        """Told True on each connection and False on each loss."""
        return self._listeners.add(listener)

    def publish(self, topic: str, payload: Mapping[str, Any] | None, *, retain: bool = False,
                qos: int = 0) -> None:
        """Queue a JSON message; sent as soon as the broker is reachable. `None` sends an empty
        payload: retained, it clears the topic's retained message."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        body = b"" if payload is None else json.dumps(payload).encode()
        self._queue.append(_Outgoing(topic, body, qos, retain))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---- the connection loop ------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled. Backoff restarts after every connection that succeeded."""
        while True:
            retrying = AsyncRetrying(
                wait=(wait_exponential(multiplier=0.05, max=self._backoff_max_s)
                      + wait_random(0, 0.1)),
                retry=retry_if_exception_type((aiomqtt.MqttError, OSError)),
                before_sleep=self._log_retry,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._session()

    async def _session(self) -> None:
        """Connect and serve until the connection drops. Returns after a drop, raises when the
        connection could not be made (so only failed connects back off)."""
        self._changed.clear()  # the settings read below are the newest
        client = aiomqtt.Client(
            self.settings.host, self.settings.port, username=self._username,
            password=self._password, identifier=self._client_id, timeout=CONNECT_TIMEOUT_S,
            keepalive=KEEPALIVE_S, tls_context=self._tls)
        established = False
        lost: BaseException | None = None
        try:
            async with client:
                for pattern, _ in self._handlers:
                    await client.subscribe(self.prefix + pattern, timeout=PUBLISH_TIMEOUT_S)
                    _reraise_lost_cancellation()
                established = True
                self._client = client
                self._set_connected(True)
                # No child task ever raises: the body raises when the connection drops or the
                # settings change, and the group cancels the children. So the run task is never
                # cancelled by the group (whose cancel/uncancel is unreliable on 3.11).
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._sender(client), name="mqtt-sender")
                    receiving = tg.create_task(self._receiving(client), name="mqtt-receiver")
                    changed = tg.create_task(self._changed.wait(), name="mqtt-settings")
                    await asyncio.wait({receiving, changed},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if receiving.done():
                        raise receiving.result()
                    raise Reconfigured("settings changed: reconnecting")
        except* (aiomqtt.MqttError, OSError) as group:
            if not established:
                raise group.exceptions[0] from None
            lost = group.exceptions[0]
        finally:
            self._client = None
            self._set_connected(False)
        if isinstance(lost, Reconfigured):
            log.info("MQTT reconnecting to %s:%d", self.settings.host, self.settings.port)
        else:
            log.warning("MQTT broker %s:%d lost: %s", self.settings.host, self.settings.port,
                        lost)

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            while self._queue:
                message = self._queue[0]
                try:
                    await client.publish(self.prefix + message.topic, message.payload,
                                         qos=message.qos,
                                         retain=message.retain, timeout=PUBLISH_TIMEOUT_S)
                except aiomqtt.MqttError as exc:
                    # kept at the head of the queue; the receiver sees a real disconnect
                    log.debug("MQTT publish to %s failed (%s); will retry", message.topic, exc)
                    await asyncio.sleep(SEND_RETRY_S)
                    continue
                _reraise_lost_cancellation()
                if self._queue and self._queue[0] is message:
                    self._queue.popleft()  # only once sent: a drop mid-send resends it
            self._wake.clear()
            await self._wake.wait()

    async def _receiving(self, client: aiomqtt.Client) -> aiomqtt.MqttError | OSError:
        """Dispatch messages until the connection drops; return (not raise) why it did."""
        try:
            await self._receiver(client)
        except (aiomqtt.MqttError, OSError) as exc:
            return exc
        return aiomqtt.MqttError("message stream ended")

    async def _receiver(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value.removeprefix(self.prefix)
            payload = message.payload if isinstance(message.payload, bytes) else \
                str(message.payload or "").encode()
            for pattern, handler in list(self._handlers):
                if aiomqtt.Topic(message.topic.value).matches(self.prefix + pattern):
                    try:
                        handler(topic, payload)
                    except Exception:  # a handler's bug must not take the link down
                        log.exception("MQTT handler for %s failed on %s", pattern, topic)

    def _set_connected(self, up: bool) -> None:
        if up == self.connected:
            return
        self.connected = up
        if up:
            self.connections += 1
            log.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)
        self._listeners.notify(up)

    def _log_retry(self, state: Any) -> None:
        if state.attempt_number == 1:  # once per outage, not once per attempt
            log.warning("MQTT broker %s:%d unreachable (%s); retrying with backoff",
                        self.settings.host, self.settings.port, state.outcome.exception())


def _tls_context(settings: MqttTls) -> ssl.SSLContext:
    """Verify the broker against `ca_file` (and its name against `mqtt.host`)."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file, password=_no_password)
    return context


def _no_password() -> bytes:
    raise ValueError("the key is encrypted (the router takes unencrypted keys only)")


def _reraise_lost_cancellation() -> None:
    """aiomqtt times its calls with `asyncio.wait_for`, which on Python 3.11 can return a result
    and drop a cancellation that arrived as the call completed (fixed in 3.12). Without this
    check a cancelled link could wait forever for the next message to send."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _log_failure(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            log.warning("MQTT live subscribe failed: %s", task.exception())
