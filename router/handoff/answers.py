"""What people at the destination say of a handoff once its CAD has it, and which answer may
follow which: pure rules, no I/O.

A dispatcher accepts (`acknowledged`) or rejects (`rejected`, with a cause) a delivered
handoff; later it is closed (`completed`, outcome `completed` or `aborted`). The same answer
twice is a repeat, recorded once; a different answer to what is already recorded is refused as
a conflict, never silently replaces it. A rejection may send the handoff on to another
partner (`offered`): answers count from the latest offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from adapters.base import OUTCOMES, Answer, AnswerRefused
from router.config import RouterConfig
from router.engine.model import Service
from router.handoff.incident import TERMINAL, Status
from router.handoff.store import HistoryEntry, StoredHandoff

ANSWERED = {"acknowledgement": (Status.ACKNOWLEDGED, Status.REJECTED),
            "completion": (Status.COMPLETED,)}


@dataclass(frozen=True, slots=True)
class Step:
    """The status change an answer makes."""

    status: Status
    detail: str
    data: dict[str, str] = field(default_factory=dict)
    to: str | None = None  # offered to this force next


def since_offer(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """The entries since the handoff was last offered to a new destination."""
    for n in range(len(history) - 1, -1, -1):
        if history[n].status == Status.OFFERED:
            return list(history[n + 1:])
    return list(history)


def recorded(h: StoredHandoff, kind: str) -> HistoryEntry | None:
    """The answer of this kind already recorded for the current destination, if any."""
    found = [e for e in since_offer(h.history) if e.status in ANSWERED[kind]]
    return found[-1] if found else None


def step_for(h: StoredHandoff, answer: Answer) -> Step | None:
    """The change `answer` makes to `h`; None if it repeats what is recorded. Raises
    AnswerRefused (`invalid`, `not_delivered`, `conflict`)."""
    if answer.outcome not in OUTCOMES[answer.kind]:
        raise AnswerRefused("invalid", f"outcome: {answer.outcome!r} is not an "
                            f"{answer.kind} (one of {', '.join(OUTCOMES[answer.kind])})")
    if answer.outcome == "rejected" and not answer.cause.strip():
        raise AnswerRefused("invalid", "cause: a rejection must say why")
    before = recorded(h, answer.kind)
    if before is not None:
        same = before.data.get("outcome") == answer.outcome and (
            answer.outcome != "rejected" or before.data.get("cause") == answer.cause)
        if same:
            return None
        raise AnswerRefused("conflict", f"handoff {h.id} was already answered: {before.status} "
                            f"({before.data.get('outcome')}) at the destination")
    if h.status in TERMINAL:
        raise AnswerRefused("conflict", f"handoff {h.id} is {h.status}: it takes no answers")
    if h.delivered_at is None:
        raise AnswerRefused("not_delivered", f"handoff {h.id} is not delivered yet "
                            f"({h.status}); answer once its CAD has it")
    who = answer.by.strip()
    data = {"outcome": answer.outcome, **({"by": who} if who else {}),
            **({"reference": answer.reference} if answer.reference else {})}
    if answer.kind == "completion":
        if answer.note:
            data["note"] = answer.note
        return Step(Status.COMPLETED, f"{answer.outcome} at {h.to_force}", data)
    if answer.outcome == "accepted":
        return Step(Status.ACKNOWLEDGED, f"accepted by {who or 'a dispatcher'} at {h.to_force}",
                    data)
    data["cause"] = answer.cause
    return Step(Status.REJECTED, f"rejected by {who or 'a dispatcher'} at {h.to_force}: "
                f"{answer.cause}", data)


def offered_to(h: StoredHandoff) -> list[str]:
    """Every destination the handoff has had, the first (the incident's own `to`) first."""
    return [str(h.incident.get("to") or h.to_force),
            *[e.data["to"] for e in h.history if e.status == Status.OFFERED and "to" in e.data]]


def next_partner(config: RouterConfig, h: StoredHandoff) -> str | None:
    """After a rejection: the rejecting force's next overflow partner for the incident's
    service (weighted ones in order, then standby) that is not the sender and has not had it."""
    force = config.forces.get(h.to_force)
    service = h.incident.get("service")
    if force is None or service not in {s.value for s in Service}:
        return None
    routes = force.overflow[Service(service)]
    had = set(offered_to(h)) | {h.from_force, h.to_force}
    for route in sorted(routes, key=lambda r: r.standby):
        if route.to not in had and route.to in config.forces:
            return route.to
    return None


def reoffer(step: Step, to: str) -> Step:
    """A rejection that sends the handoff on instead of back."""
    return Step(Status.OFFERED, f"{step.detail}; offered to {to}", {**step.data, "to": to}, to)
