"""Telling a handoff's sender how it is going: each step (delivered, acknowledged, rejected,
offered on, completed, escalated, failed) as one status message, once it is durable.

Two ways out, both best effort (the sender can always read `GET /v1/handoffs/{id}` with its
own token, and the store has the whole history): the router's `notify` callback, which
publishes on MQTT `overflow/handoffs/{from}/status` and POSTs to the sender's `notify_url`;
and the sender's own CAD adapter, where it takes updates (`adapters.base.Updates`), with a
timeout and a few retries. A queue bounded in size keeps a slow sender from holding anything
else up; past it the oldest message is dropped, and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from adapters.base import AdapterUnavailable, Updates
from router.handoff.cads import CadLease
from router.handoff.store import HistoryEntry
from router.infra import metrics
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

Notify = Callable[[dict[str, Any]], None]

MAX_PENDING = 10_000
UPDATE_TIMEOUT_S = 5.0
UPDATE_ATTEMPTS = 3


def status_message(hid: str, incident: Mapping[str, Any], to: str, priority: str,
                   entry: HistoryEntry) -> dict[str, Any]:
    """What the sender hears of one step: which handoff, where it is, and what people said."""
    return {"handoff_id": hid, "incident_id": incident.get("incident_id"),
            "from": incident.get("from"), "to": to, "priority": priority,
            "status": str(entry.status), "at": iso(entry.at),
            **({"detail": entry.detail} if entry.detail else {}), **entry.data}


class Notices:
    def __init__(self, notify: Notify | None,
                 adapter_of: Callable[[str], CadLease | None]) -> None:
        self._notify = notify
        self._adapter_of = adapter_of
        self._queue: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._wake = asyncio.Event()

    def tell(self, message: dict[str, Any]) -> None:
        """Queue a message for the sender; never awaits, never raises."""
        if self._notify is not None:
            try:
                self._notify(message)
            except Exception:
                log.exception("handoff status callback failed")
        if len(self._queue) == self._queue.maxlen:
            log.error("handoff status queue full: dropping the oldest update")
        self._queue.append(message)
        self._wake.set()

    async def run(self) -> None:
        """Pass queued messages to senders' adapters that take updates, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            while True:
                while self._queue:
                    message = self._queue.popleft()
                    cad = self._adapter_of(str(message.get("from")))
                    if cad is not None and isinstance(cad.adapter, Updates):
                        tg.create_task(self._update(cad, message))
                self._wake.clear()
                await self._wake.wait()

    async def _update(self, cad: CadLease, message: dict[str, Any]) -> None:
        retrying = AsyncRetrying(stop=stop_after_attempt(UPDATE_ATTEMPTS),
                                 wait=wait_exponential(min=0.2, max=2), reraise=True,
                                 retry=retry_if_exception_type((AdapterUnavailable,
                                                                TimeoutError)))
        try:
            with cad.lease() as adapter:
                async for attempt in retrying:
                    with attempt:
                        async with asyncio.timeout(UPDATE_TIMEOUT_S):
                            await adapter.update(message)  # type: ignore[attr-defined]
            metrics.HANDOFF_NOTICES.labels(str(message.get("from")), "sent").inc()
        except Exception as exc:  # an adapter's fault must not stop the others' updates
            metrics.HANDOFF_NOTICES.labels(str(message.get("from")), "failed").inc()
            log.error("could not tell %s's CAD that handoff %s is %s: %s",
                      message.get("from"), message.get("handoff_id"), message.get("status"),
                      exc or type(exc).__name__)
