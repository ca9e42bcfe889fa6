"""Escalation of handoffs that miss a deadline: for delivery (per priority, from acceptance)
or for a dispatcher's answer (per priority, from delivery). Status `escalated` (delivery keeps
trying; a late answer is still recorded), a printable sheet for the control room, and an alert
through the injected callback."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from router.config import Handoff
from router.handoff.incident import Status
from router.handoff.live import MAX_IDLE_S, Journal, Live
from router.handoff.sheets import Sheet, sheet_paths, write_sheet
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

Alert = Callable[[dict[str, Any]], None]
Waiting = Literal["delivery", "acknowledgement"]


class Escalator:
    """Watches the deadlines of the desk's live handoffs (`live`, by id: delivery) and of
    those delivered and awaiting a dispatcher (`awaiting`, by id); `run` in a task."""

    def __init__(self, settings: Handoff, journal: Journal, live: Mapping[str, Live],
                 awaiting: dict[str, Live], *, alert: Alert,
                 clock: Callable[[], float]) -> None:
        self.journal = journal
        self.alert = alert
        self.clock = clock
        self._watched: dict[Waiting, Mapping[str, Live]] = {"delivery": live,
                                                            "acknowledgement": awaiting}
        self._awaiting = awaiting  # escalated, a handoff waits no more (a late answer counts)
        self._heaps: dict[Waiting, list[tuple[float, str]]] = {}  # (due, handoff id)
        self._wake = asyncio.Event()
        self.configure(settings)

    def configure(self, settings: Handoff) -> None:
        """New deadlines apply to every unfinished handoff, not just to those accepted next."""
        self.spool_dir = Path(settings.spool_dir)
        self._limits: dict[Waiting, dict[str, float]] = {
            "delivery": {str(k): v for k, v in settings.deadlines_s.items()},
            "acknowledgement": {str(k): v for k, v in settings.ack_deadlines_s.items()}}
        for waiting, items in self._watched.items():
            self._heaps[waiting] = [due for item in items.values()
                                    if (due := self._due(waiting, item)) is not None]
            heapq.heapify(self._heaps[waiting])
        self._wake.set()

    def _due(self, waiting: Waiting, item: Live) -> tuple[float, str] | None:
        limit = self._limits[waiting].get(item.priority)
        start = item.accepted_at if waiting == "delivery" else item.delivered_at
        if item.escalated or limit is None or start is None:
            return None
        return start + limit, item.id

    def watch(self, item: Live, waiting: Waiting = "delivery") -> None:
        due = self._due(waiting, item)
        if due is not None:
            heapq.heappush(self._heaps[waiting], due)
            self._wake.set()

    async def run(self) -> None:
        while True:
            now = self.clock()
            due: list[tuple[Waiting, Live]] = []
            for waiting, heap in self._heaps.items():
                while heap and heap[0][0] <= now:
                    _, hid = heapq.heappop(heap)
                    item = self._watched[waiting].get(hid)
                    if item is not None and not item.escalated and not item.done:
                        due.append((waiting, item))
            if due:
                await asyncio.gather(*(self._escalate(item, waiting) for waiting, item in due))
            nexts = [heap[0][0] for heap in self._heaps.values() if heap]
            wait = min(nexts) - now if nexts else MAX_IDLE_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait, 0.0), MAX_IDLE_S)):
                    await self._wake.wait()

    async def _escalate(self, item: Live, waiting: Waiting) -> None:
        now = self.clock()
        due = self._due(waiting, item)  # a reload may have changed the deadline since
        if item.done or item.id not in self._watched[waiting] or due is None or now < due[0]:
            return
        deadline = self._limits[waiting][item.priority]
        item.escalated = True
        if waiting == "acknowledgement":
            self._awaiting.pop(item.id, None)
        before = item.status
        what = ("not delivered" if waiting == "delivery"
                else "delivered, but not accepted or rejected by a dispatcher")
        try:
            await self.journal.record(item, Status.ESCALATED,
                                      f"{what} within the {item.priority} deadline of "
                                      f"{deadline:g}s (was {before})", escalated_at=now)
        except Exception as exc:
            log.error("escalating handoff %s: %s", item.id, exc)
        await self._side_effects(item, waiting, deadline, str(before), now)

    async def replay(self, item: Live, waiting: Waiting, escalated_at: float) -> None:
        """After a restart: an escalation on record whose sheet is missing (the process died
        between the two) gets its sheet and its alert now. At least once: a sheet rewritten
        is the same sheet."""
        html_path, _ = sheet_paths(self.spool_dir, item.incident, item.id)
        if await asyncio.to_thread(html_path.exists):
            return
        log.warning("handoff %s was escalated but its sheet is missing: writing it now", item.id)
        deadline = self._limits[waiting].get(item.priority, 0.0)
        await self._side_effects(item, waiting, deadline, "escalated before a restart",
                                 escalated_at)

    async def _side_effects(self, item: Live, waiting: Waiting, deadline: float, before: str,
                            now: float) -> None:
        """The printable sheet, then the alert: what the control room acts on."""
        try:
            html_path, csv_path = await asyncio.to_thread(write_sheet, self.spool_dir, Sheet(
                item.id, item.incident, item.accepted_at, now, before, item.reason))
        except Exception as exc:
            log.error("escalation sheet of handoff %s: %s", item.id, exc)
            html_path = csv_path = Path()
        alert = {
            "kind": "handoff_escalated", "handoff_id": item.id,
            "incident_id": item.incident.get("incident_id"), "from": item.incident.get("from"),
            "to": item.to, "priority": item.priority, "waiting_for": waiting,
            "deadline_s": deadline,
            "age_s": round(now - item.accepted_at, 3), "delivery": before,
            "reason": item.reason, "at": iso(now),
            "sheet": str(html_path) if html_path.name else None,
            "csv": str(csv_path) if csv_path.name else None,
        }
        try:
            self.alert(alert)
        except Exception:
            log.exception("escalation alert callback failed")
