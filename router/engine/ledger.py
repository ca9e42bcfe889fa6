"""Calls in flight: who is carrying which call, so capacity rules and mutual-aid caps hold.

Pure bookkeeping, no clock of its own: callers pass `now` (the service uses monotonic seconds).
Several routers may share the same centres: each counts its own calls (`in_flight`, `aid`,
`aid_from`, `by_service`, what it tells the others) and is told theirs as one `Counts` summary
(`peers`, set from outside: router.watch.peers). The engine reads only the totals, own plus
peers (`total_in_flight`, `total_aid`, `total_aid_from`, `total_by_service`), kept up to date
on every change so that a read on the route path stays one dict lookup. Only this module
changes any of them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from router.engine.model import Decision, Service

K = TypeVar("K")


def _summed(*parts: Mapping[K, int]) -> dict[K, int]:
    out: dict[K, int] = {}
    for part in parts:
        for key, n in part.items():
            out[key] = out.get(key, 0) + n
    return {k: n for k, n in out.items() if n}


def _scaled(counts: Mapping[K, int], share: float) -> dict[K, int]:
    return {k: math.ceil(n * share) for k, n in counts.items()}


@dataclass(frozen=True, slots=True)
class Counts:
    """Calls in flight as one router (or several, summed) counts them: what routers share."""

    in_flight: Mapping[str, int] = field(default_factory=dict)  # per destination
    aid: Mapping[str, int] = field(default_factory=dict)  # per partner, for other forces
    aid_from: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (partner, origin)
    by_service: Mapping[tuple[str, Service], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        """Whether any call is counted at all."""
        return any(any(d.values()) for d in (self.in_flight, self.aid, self.aid_from,
                                             self.by_service))

    @staticmethod
    def sum(parts: Iterable[Counts]) -> Counts:
        parts = list(parts)
        return Counts(_summed(*(p.in_flight for p in parts)), _summed(*(p.aid for p in parts)),
                      _summed(*(p.aid_from for p in parts)),
                      _summed(*(p.by_service for p in parts)))

    def scaled(self, share: float) -> Counts:
        """`share` of these calls, each count rounded up: a share of calls still in flight
        is never under-counted by rounding (0 < share gives at least 1 of every count)."""
        if share >= 1.0:
            return self
        if share <= 0.0:
            return Counts()
        return Counts(_scaled(self.in_flight, share), _scaled(self.aid, share),
                      _scaled(self.aid_from, share), _scaled(self.by_service, share))


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
        # this router's own calls: what it tells the others
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # every call a centre carries
        self.aid: defaultdict[str, int] = defaultdict(int)  # of which, taken for other forces
        self.aid_from: defaultdict[tuple[str, str], int] = defaultdict(int)  # (partner, origin)
        self.by_service: defaultdict[tuple[str, Service], int] = defaultdict(int)
        self._peers = Counts()
        self._alone = True
        # own + peers: all the engine reads (`.get(key, 0)`, a plain dict lookup on the route
        # path). While no peer has a call in flight they are the own counters themselves.
        self.total_in_flight = self.in_flight
        self.total_aid = self.aid
        self.total_aid_from = self.aid_from
        self.total_by_service = self.by_service

    @property
    def peers(self) -> Counts:
        """The other routers' calls, as last told (router.watch.peers sets it)."""
        return self._peers

    @peers.setter
    def peers(self, counts: Counts) -> None:
        self._peers = counts
        self._alone = not counts
        if self._alone:
            self.total_in_flight, self.total_aid = self.in_flight, self.aid
            self.total_aid_from, self.total_by_service = self.aid_from, self.by_service
            return
        self.total_in_flight = defaultdict(int, _summed(self.in_flight, counts.in_flight))
        self.total_aid = defaultdict(int, _summed(self.aid, counts.aid))
        self.total_aid_from = defaultdict(int, _summed(self.aid_from, counts.aid_from))
        self.total_by_service = defaultdict(int, _summed(self.by_service, counts.by_service))

    def own(self) -> Counts:
        """This router's calls in flight, as it tells the others (zero counts left out)."""
        return Counts(_summed(self.in_flight), _summed(self.aid), _summed(self.aid_from),
                      _summed(self.by_service))

    # ---- counting ----------------------------------------------------------------------

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
        if not self._alone:
            self.total_in_flight[force] += calls

    def _count(self, call: Call, delta: int) -> None:
        to = call.destination
        self.in_flight[to] += delta
        self.by_service[(to, call.service)] += delta
        aided = to != call.origin
        if aided:
            self.aid[to] += delta
            self.aid_from[(to, call.origin)] += delta
        if not self._alone:  # the totals are separate counters: they change as well
            self.total_in_flight[to] += delta
            self.total_by_service[(to, call.service)] += delta
            if aided:
                self.total_aid[to] += delta
                self.total_aid_from[(to, call.origin)] += delta
