"""Unfinished handoffs as the desk tracks them in memory, and the journal that records each
status change they go through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.handoff.incident import RANK, Status
from router.handoff.store import HandoffStore, StatusChange
from router.infra import metrics

MAX_IDLE_S = 1.0  # an idle loop re-checks the world at least this often


@dataclass(slots=True)
class Live:
    """An unfinished handoff."""

    id: str
    to: str
    priority: str
    accepted_at: float
    incident: dict[str, Any]
    status: Status
    attempts: int = 0
    escalated: bool = False
    reason: str = ""
    done: bool = False  # its final status is being written: escalation must leave it alone
    finished: bool = False  # its final status is stored and the desk has let it go

    @property
    def order(self) -> tuple[int, float, str]:
        """Delivery order: P1 first, then oldest."""
        return RANK[self.priority], self.accepted_at, self.id


class Journal:
    """Status changes, recorded through the store's group commit in the order they are made."""

    def __init__(self, store: HandoffStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    def record_soon(self, item: Live, status: Status, detail: str, *,
                    reason: str | None = None, escalated_at: float | None = None,
                    delivered_at: float | None = None) -> asyncio.Future[None]:
        """Queue a status change; await the result for durability."""
        committed = self.store.record_soon(StatusChange(
            item.id, status, self.clock(), detail, item.attempts, reason,
            escalated_at=escalated_at, delivered_at=delivered_at))
        item.status = status
        metrics.HANDOFF_OUTCOMES.labels(item.to, status).inc()
        return committed

    async def record(self, item: Live, status: Status, detail: str, *,
                     reason: str | None = None, escalated_at: float | None = None,
                     delivered_at: float | None = None) -> None:
        await self.record_soon(item, status, detail, reason=reason,
                               escalated_at=escalated_at, delivered_at=delivered_at)
