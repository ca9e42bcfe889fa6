"""Recording what people at a handoff's destination answer, and acting on it: the sender is
told, a rejection is alerted at once and sent back or on (`handoff.on_reject`), and the
handoff stops waiting for a dispatcher. The rules of which answer may follow which are in
`answers`; this is the I/O around them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from adapters.base import Answer, AnswerRefused
from router.handoff.answers import reoffer, step_for
from router.handoff.escalation import Alert
from router.handoff.incident import TERMINAL, Status
from router.handoff.live import Live
from router.handoff.notices import Notices, status_message
from router.handoff.store import HandoffStore, HistoryEntry, StatusChange, StoredHandoff
from router.infra import metrics
from router.infra.timefmt import iso

log = logging.getLogger(__name__)


def rejection_alert(h: StoredHandoff, entry: HistoryEntry) -> dict[str, Any]:
    return {"kind": "handoff_rejected", "handoff_id": h.id, "incident_id": h.incident_id,
            "from": h.from_force, "to": h.to_force, "priority": h.priority,
            "cause": entry.data.get("cause", ""), "by": entry.data.get("by", ""),
            "next": entry.data.get("to"), "at": iso(entry.at)}


class Answering:
    """`answer` records one answer; `awaiting` holds the delivered handoffs still waiting
    for a dispatcher (their deadlines are the escalator's)."""

    def __init__(self, store: HandoffStore, notices: Notices, *, alert: Alert,
                 clock: Callable[[], float], next_to: Callable[[StoredHandoff], str | None],
                 track: Callable[[Live], None]) -> None:
        self.store = store
        self.notices = notices
        self.alert = alert
        self.clock = clock
        self.next_to = next_to  # where a rejected handoff goes on to, if anywhere
        self.track = track  # delivers a handoff offered to another destination
        self.awaiting: dict[str, Live] = {}
        self._lock = asyncio.Lock()  # read, check and record as one: answers are few

    async def answer(self, answer: Answer, force: str) -> StoredHandoff:
        """Record an answer from `force` durably and return the handoff as it now stands. A
        repeat is recorded once. Raises AnswerRefused, StoreError."""
        async with self._lock:
            h = await self.store.get(answer.handoff_id)
            if h is None:
                raise AnswerRefused("not_found", f"no handoff {answer.handoff_id}")
            if h.to_force != force:
                raise AnswerRefused("forbidden", f"handoff {h.id} was sent to {h.to_force}, "
                                    f"not {force}: only its destination answers for it")
            step = step_for(h, answer)
            if step is None:
                return h
            if step.status == Status.REJECTED and (to := self.next_to(h)) is not None:
                step = reoffer(step, to)
            now = self.clock()
            at = answer.at if answer.at is not None else now
            await self.store.record(StatusChange(
                h.id, step.status, now, step.detail, h.attempts,
                data={**step.data, "answered_at": iso(at)}, to_force=step.to))
        metrics.HANDOFF_OUTCOMES.labels(h.to_force, step.status).inc()
        if answer.kind == "acknowledgement" and h.delivered_at is not None:
            metrics.HANDOFF_ANSWER_SECONDS.labels(h.to_force).observe(
                max(at - h.delivered_at, 0.0))
        self.awaiting.pop(h.id, None)
        entry = HistoryEntry(now, step.status, step.detail, step.data)
        self.notices.tell(status_message(h.id, h.incident, h.to_force, h.priority, entry))
        if step.status in (Status.REJECTED, Status.OFFERED):
            try:  # the sender's control room hears of a rejection at once
                self.alert(rejection_alert(h, entry))
            except Exception:
                log.exception("rejection alert callback failed")
        if step.to is not None:  # on to the next partner: delivered afresh
            self.track(Live(h.id, step.to, h.priority, h.accepted_at, h.incident,
                            Status.OFFERED))
        return await self.store.get(h.id) or h

    async def on_paper(self, hid: str, operator: str, reason: str,
                       drop: Callable[[str], None]) -> StoredHandoff | None:
        """A manager's word that the control room handles `hid` on paper: `drop` stops its
        delivery first, so no attempt starts meanwhile; then recorded (who and why) as final,
        so no deadline escalates it again, and the sender is told. None if there is no such
        handoff. Raises AnswerRefused (`conflict`) if it is final already, StoreError."""
        async with self._lock:
            h = await self.store.get(hid)
            if h is None:
                return None
            if h.status in TERMINAL:
                raise AnswerRefused("conflict", f"handoff {hid} is {h.status}: nothing to stop")
            drop(hid)
            self.awaiting.pop(hid, None)
            now = self.clock()
            entry = HistoryEntry(now, Status.ON_PAPER,
                                 f"handled on paper by {operator}: {reason}",
                                 {"by": operator, "note": reason})
            await self.store.record(StatusChange(hid, entry.status, now, entry.detail,
                                                 h.attempts, data=entry.data))
        metrics.HANDOFF_OUTCOMES.labels(h.to_force, Status.ON_PAPER).inc()
        self.notices.tell(status_message(h.id, h.incident, h.to_force, h.priority, entry))
        return await self.store.get(hid) or h
