"""Calls in flight: who is carrying which call, so capacity rules and mutual-aid caps hold.

Pure bookkeeping, no clock of its own: callers pass `now` (the service uses monotonic seconds).
The engine reads the counters directly; only this module changes them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from router.engine.model import Decision, Service


@dataclass(frozen=True, slots=True)
class Call:
    call_id: str
    service: Service
    origin: str
    destination: str
    started_at: float


class Ledger:
    def __init__(self) -> None:
        self.calls: dict[str, Call] = {}
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # every call a centre carries
        self.aid: defaultdict[str, int] = defaultdict(int)  # of which, taken for other forces
        self.aid_from: defaultdict[tuple[str, str], int] = defaultdict(int)  # (partner, origin)
        self.by_service: defaultdict[tuple[str, Service], int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, call_id: str, decision: Decision, now: float) -> bool:
        """Count a routed call. A call_id already in flight is not counted twice (retries of
        the same route request must not eat capacity); returns False then."""
        if call_id in self.calls:
            return False
        call = Call(call_id, decision.service, decision.origin, decision.destination, now)
        self.calls[call_id] = call
        self._count(call, 1)
        return True

    def end(self, call_id: str) -> Call | None:
        """Free a call's capacity. Idempotent: an unknown or already-ended call is a no-op."""
        call = self.calls.pop(call_id, None)
        if call is not None:
            self._count(call, -1)
        return call

    def expire(self, now: float, max_age_s: float, limit: int = 100) -> list[Call]:
        """End up to `limit` calls older than max_age_s: a lost 'call ended' must not leak
        capacity forever. The limit keeps one sweep short; callers sweep again while full."""
        stale: list[Call] = []
        for call in self.calls.values():  # in start order: dicts keep insertion order
            if now - call.started_at <= max_age_s or len(stale) >= limit:
                break
            stale.append(call)
        for call in stale:
            self.end(call.call_id)
        return stale

    def preload(self, force: str, calls: int) -> None:
        """Count calls a force already carries that the router did not route (what-if load)."""
        self.in_flight[force] += calls

    def _count(self, call: Call, delta: int) -> None:
        self.in_flight[call.destination] += delta
        self.by_service[(call.destination, call.service)] += delta
        if call.destination != call.origin:
            self.aid[call.destination] += delta
            self.aid_from[(call.destination, call.origin)] += delta
