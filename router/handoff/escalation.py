"""Escalation of handoffs that miss their priority's deadline: status `escalated` (delivery
keeps trying), a printable sheet for the control room, and an alert through the injected
callback."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from router.config import Handoff
from router.handoff.incident import Status
from router.handoff.live import MAX_IDLE_S, Journal, Live
from router.handoff.sheets import Sheet, write_sheet
from router.infra.timefmt import iso

log = logging.getLogger(__name__)

Alert = Callable[[dict[str, Any]], None]


class Escalator:
    """Watches the deadlines of the desk's live handoffs (`live`, by id); `run` in a task."""

    def __init__(self, settings: Handoff, journal: Journal, live: Mapping[str, Live], *,
                 alert: Alert, clock: Callable[[], float]) -> None:
        self.journal = journal
        self.alert = alert
        self.clock = clock
        self._live = live
        self._deadlines: list[tuple[float, str]] = []  # a heap of (due, handoff id)
        self._wake = asyncio.Event()
        self.configure(settings)

    def configure(self, settings: Handoff) -> None:
        """New deadlines apply to every unfinished handoff, not just to those accepted next."""
        self.spool_dir = Path(settings.spool_dir)
        self._deadline_s: dict[str, float] = {str(k): v for k, v in settings.deadlines_s.items()}
        self._deadlines = [(item.accepted_at + self._deadline_s[item.priority], item.id)
                           for item in self._live.values()
                           if not item.escalated and item.priority in self._deadline_s]
        heapq.heapify(self._deadlines)
        self._wake.set()

    def watch(self, item: Live) -> None:
        limit = self._deadline_s.get(item.priority)
        if not item.escalated and limit is not None:
            heapq.heappush(self._deadlines, (item.accepted_at + limit, item.id))
            self._wake.set()

    async def run(self) -> None:
        while True:
            now = self.clock()
            due = []
            while self._deadlines and self._deadlines[0][0] <= now:
                _, hid = heapq.heappop(self._deadlines)
                item = self._live.get(hid)
                if item is not None and not item.escalated and not item.done:
                    due.append(item)
            if due:
                await asyncio.gather(*(self._escalate(item) for item in due))
            wait = self._deadlines[0][0] - now if self._deadlines else MAX_IDLE_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait, 0.0), MAX_IDLE_S)):
                    await self._wake.wait()

    async def _escalate(self, item: Live) -> None:
        now = self.clock()
        deadline = self._deadline_s.get(item.priority)  # a reload may have changed it since
        if (item.done or item.id not in self._live or deadline is None
                or now < item.accepted_at + deadline):
            return
        item.escalated = True
        before = item.status
        try:
            await self.journal.record(item, Status.ESCALATED,
                                      f"not delivered within the {item.priority} deadline of "
                                      f"{deadline:g}s (was {before})", escalated_at=now)
            html_path, csv_path = await asyncio.to_thread(write_sheet, self.spool_dir, Sheet(
                item.id, item.incident, item.accepted_at, now, str(before), item.reason))
        except Exception as exc:
            log.error("escalating handoff %s: %s", item.id, exc)
            html_path = csv_path = Path()
        alert = {
            "kind": "handoff_escalated", "handoff_id": item.id,
            "incident_id": item.incident.get("incident_id"), "from": item.incident.get("from"),
            "to": item.to, "priority": item.priority, "deadline_s": deadline,
            "age_s": round(now - item.accepted_at, 3), "delivery": str(before),
            "reason": item.reason, "at": iso(now),
            "sheet": str(html_path) if html_path.name else None,
            "csv": str(csv_path) if csv_path.name else None,
        }
        try:
            self.alert(alert)
        except Exception:
            log.exception("escalation alert callback failed")
