"""Unfinished handoffs as the desk tracks them in memory, and the journal that records each
status change they go through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.handoff.incident import RANK, Status
from router.handoff.store import HandoffStore, HistoryEntry, StatusChange, StoredHandoff
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
    delivered_at: float | None = None  # then it awaits a dispatcher's answer
    deferrals: int = 0  # times the CAD could not take it (it alone) and it was put back
    not_before: float = 0.0  # a deferred handoff waits until then

    @classmethod
    def of(cls, h: StoredHandoff, *, escalated: bool) -> Live:
        """A stored handoff taken on (claimed) by this router."""
        return cls(h.id, h.to_force, h.priority, h.accepted_at, h.incident, Status(h.status),
                   h.attempts, escalated, h.reason, delivered_at=h.delivered_at)

    @property
    def sender(self) -> str:
        return str(self.incident.get("from", ""))

    @property
    def order(self) -> tuple[int, float, str]:
        """Delivery order: P1 first, then oldest."""
        return RANK[self.priority], self.accepted_at, self.id


# what a handoff's sender hears of, as each is recorded
TOLD = frozenset({Status.DELIVERED, Status.ESCALATED, Status.FAILED, Status.ACKNOWLEDGED,
                  Status.REJECTED, Status.OFFERED, Status.COMPLETED})

Told = Callable[["Live", Status, HistoryEntry], None]


class Journal:
    """Status changes, recorded through the store's group commit in the order they are made;
    `told` hears each one the sender is told of, once it is durable."""

    def __init__(self, store: HandoffStore, clock: Callable[[], float],
                 told: Told | None = None) -> None:
        self.store = store
        self.clock = clock
        self.told = told

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
        at = self.clock()
        await self.record_soon(item, status, detail, reason=reason,
                               escalated_at=escalated_at, delivered_at=delivered_at)
        if self.told is not None and status in TOLD:
            self.told(item, status, HistoryEntry(at, status, detail))
