"""The call desk: the one place calls are decided, counted and ended.

It wraps the pure engine with what a live service needs: the clock, decision ids, idempotent
retries of the same call, metrics, and expiry of calls whose end was never reported.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import DecisionRecord, Service, Snapshot, decision_record
from router.engine.policy import Policy
from router.engine.rules import HomeShare
from router.infra import metrics
from router.infra.timefmt import iso


class CallConflict(Exception):
    """The same call_id was routed before for another service or origin."""


class CallDesk:
    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.policy = Policy(config)
        self.ledger = Ledger()
        self.max_call_duration_s = config.service.max_call_duration_s
        self._clock = clock
        self._wall = wall_clock
        self._records: dict[str, DecisionRecord] = {}
        self._boot = uuid.uuid4().hex[:8]
        self._seq = 0
        # told each end telephony reports here, so other routers free the call if they hold
        # it (router.watch.peers): the end may reach a router that did not route the call, or
        # two routers may hold it (Kamailio asked the second when the first was slow)
        self.on_end: Callable[[str], None] | None = None

    def reconfigure(self, config: RouterConfig) -> None:
        """Swap the rules; calls in flight stay counted against the forces carrying them."""
        self.policy = Policy(config)
        self.max_call_duration_s = config.service.max_call_duration_s

    def route(self, call_id: str, service: Service, origin: str,
              snapshot: Snapshot) -> tuple[DecisionRecord, bool]:
        """Decide a call; a retry of a call in flight gets its first decision again.

        Returns the contract's decision record and whether it was newly decided.
        """
        known = self._records.get(call_id)
        if known is not None:
            if known["service"] != service.value or known["origin"] != origin:
                raise CallConflict(
                    f"call {call_id} was routed as {known['service']} from {known['origin']}")
            return known, False
        now = self._clock()
        started = time.perf_counter()
        decision = self.policy.decide(service, origin, snapshot, self.ledger, now)
        metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
        self.ledger.add(call_id, decision, now)
        self._seq += 1
        record = decision_record(decision, call_id, f"{self._boot}-{self._seq:x}",
                                 iso(self._wall()))
        self._records[call_id] = record
        metrics.child(metrics.CALLS_ROUTED, service.value, origin, decision.destination,
                      decision.reason.value).inc()
        metrics.child(metrics.CALLS_IN_FLIGHT, decision.destination).inc()
        return record, True

    def end(self, call_id: str) -> bool:
        """Free a call's capacity; ending an unknown or ended call is a harmless no-op."""
        return self.finish(call_id) is not None

    def finish(self, call_id: str, *, passed_on: bool = False) -> str | None:
        """End a call and say which centre it was sent to (None if unknown or already ended),
        so how it ended there can be counted against that centre once. Told to `on_end`
        unless another router passed it on."""
        if self.on_end is not None and not passed_on:
            self.on_end(call_id)
        call = self.ledger.end(call_id)
        if call is None:
            return None
        self._records.pop(call_id, None)
        metrics.child(metrics.CALLS_IN_FLIGHT, call.destination).dec()
        return call.destination

    def expire(self, limit: int = 100) -> int:
        """End calls older than the configured maximum: a lost hang-up must not leak capacity.
        At most `limit` at a time, so a sweep never stalls routing."""
        stale = self.ledger.expire(self._clock(), self.max_call_duration_s, limit)
        for call in stale:
            self._records.pop(call.call_id, None)
            metrics.child(metrics.CALLS_IN_FLIGHT, call.destination).dec()
            metrics.child(metrics.CALLS_EXPIRED, call.destination).inc()
        return len(stale)

    def routing_table(self, snapshot: Snapshot) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Current shares per origin and service, as published on MQTT and the API."""
        now = self._clock()
        table: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for origin in self.policy.config.forces:
            table[origin] = {
                service.value: [
                    {"destination": s.destination, "share": round(s.share, 4),
                     "reason": s.reason.value, "rule": s.rule}
                    for s in self.policy.plan(service, origin, snapshot, self.ledger, now)
                ]
                for service in Service
            }
        return table

    def diversions(self, snapshot: Snapshot) -> dict[str, HomeShare]:
        """Per force, what its centre keeps now and why the rest goes: the policy's own answer,
        so alerts, the API, MQTT and the dashboard say what the policy does."""
        now = self._clock()
        return {origin: self.policy.home_share(origin, snapshot, self.ledger, now)
                for origin in self.policy.config.forces}

    def load(self, force: str) -> dict[str, int]:
        """Calls a force carries now, and how many of them are mutual aid: routed by this
        router or, as they last said, by the others (router.watch.peers)."""
        ledger = self.ledger
        return {"in_flight": ledger.total_in_flight.get(force, 0),
                "aid": ledger.total_aid.get(force, 0),
                **{f"in_flight_{s.value}": ledger.total_by_service.get((force, s), 0)
                   for s in Service}}
