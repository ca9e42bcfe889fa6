"""The decision engine: where one 999 or 101 call goes, and why.

Pure and synchronous: it reads a `Snapshot` of centre states, the `Ledger` of calls in flight and
`now` (supplied by the caller), and returns a `Decision`. Its only state is the smooth weighted
round-robin position per (origin, service) and the recovery-ramp credit, so the same sequence of
inputs always gives the same sequence of decisions.

Semantics, in order, for a call from `origin`:
1. The home centre keeps the call while it is `normal` (or `unknown`: no evidence of trouble)
   and its queue is below `max_queue`; while `overloaded` only until its queue reaches
   `overflow_queue`; while `recovering`, a ramp share of calls (smoothly, not in bursts).
   `down`, `draining`, telephony down, and CAD down with `on_cad_down: overflow` keep nothing.
2. Otherwise partners are chosen by smooth weighted round robin among those `normal`, with both
   telephony and CAD up, under their mutual-aid cap (for 101: cap minus the 999 reserve), under
   the per-route cap, and with their own queue below `only_while_queue_below`.
   Weight-0 partners are standby: used only when no weighted partner can help.
3. No partner can help: a 999 goes to the least-loaded centre known to be reachable
   (`last_resort`; caps are ignored, a 999 is never refused), or home if none is known;
   a 101 is shed to the home queue, or to an announcement if home cannot take calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot

_NORMAL = CentreState.NORMAL
_UNKNOWN = CentreState.UNKNOWN
_OVERLOADED = CentreState.OVERLOADED
_DOWN = CentreState.DOWN
_DRAINING = CentreState.DRAINING
_RECOVERING = CentreState.RECOVERING
_REACHABLE = frozenset({_NORMAL, _OVERLOADED, _RECOVERING})
_999 = Service.EMERGENCY
_STATE_RULES = {s: f"state:{s.value}" for s in CentreState}


@dataclass(frozen=True, slots=True)
class _Partner:
    to: str
    weight: int
    route_cap: int | None
    sip: str
    rule: str


@dataclass(frozen=True, slots=True)
class _Force:
    id: str
    handlers: int
    overflow_queue: int
    max_queue: int
    cad_down_overflows: bool
    sip: Mapping[Service, str]
    shed_queue: str
    shed_announcement: str
    routes: Mapping[Service, tuple[_Partner, ...]]
    aid_max: int
    aid_max_101: int
    aid_queue_below: int
    # rule names, built once: a decision names the rule that made it on every call
    rule_cad_down: str = ""
    rule_overflow_queue: str = ""
    rule_max_queue: str = ""

    @property
    def capacity(self) -> int:
        return self.handlers + self.max_queue


@dataclass(frozen=True, slots=True)
class Share:
    """A planned fraction of one origin's calls for one service."""

    destination: str
    share: float
    reason: Reason
    rule: str


class Policy:
    def __init__(self, config: RouterConfig):
        self.config = config
        self._ramp = config.health.recovery.ramp
        self._ramp_step_s = config.health.recovery.step_s
        self._ramp_rules = [f"health.recovery.ramp[{i}]" for i in range(len(self._ramp))]
        # Decisions are immutable and the same few recur call after call (a handful per route),
        # so each is built once: building a frozen dataclass was most of a decision's cost
        self._decisions: dict[tuple[Service, str, str, Reason, str], Decision] = {}
        self._forces: dict[str, _Force] = {}
        for fid, f in config.forces.items():
            routes = {
                service: tuple(
                    _Partner(r.to, r.weight, r.max_concurrent, config.forces[r.to].sip[service],
                             f"forces.{fid}.overflow.{service.value}[{i}]")
                    for i, r in enumerate(f.overflow[service])
                )
                for service in Service
            }
            aid = f.mutual_aid
            self._forces[fid] = _Force(
                fid, f.centre.handlers_on_duty, f.centre.overflow_queue, f.centre.max_queue,
                f.centre.on_cad_down == "overflow", dict(f.sip), f.centre.shed_101.queue,
                f.centre.shed_101.announcement, routes, aid.max_concurrent,
                aid.max_concurrent - aid.reserve_999, aid.only_while_queue_below,
                rule_cad_down=f"forces.{fid}.centre.on_cad_down",
                rule_overflow_queue=f"forces.{fid}.centre.overflow_queue",
                rule_max_queue=f"forces.{fid}.centre.max_queue",
            )
        self._wrr = {(fid, s): [0] * len(f.routes[s])
                     for fid, f in self._forces.items() for s in Service}
        self._credit: dict[tuple[str, Service], float] = {}

    # ---- the per-call decision ------------------------------------------------------------

    def decide(self, service: Service, origin: str, snapshot: Snapshot, ledger: Ledger,
               now: float) -> Decision:
        home = self._forces[origin]
        view = snapshot.get(origin)
        share, reason, rule = self._home_share(home, service, view, ledger, now)
        if share >= 1.0:
            return self._decision(service, home, origin, Reason.HOME, rule)
        if share > 0.0:  # recovering: smooth ramp, one home call per 1/share calls
            key = (origin, service)
            credit = self._credit.get(key, 0.0) + share
            if credit >= 1.0 - 1e-9:
                self._credit[key] = credit - 1.0
                return self._decision(service, home, origin, Reason.HOME, rule)
            self._credit[key] = credit
        partner = self._pick_partner(home, service, snapshot, ledger)
        if partner is not None:
            return self._decision(service, home, partner.to, reason, partner.rule)
        if service is _999:
            return self._last_resort(home, snapshot, ledger)
        return self._shed(home, view)

    def _decision(self, service: Service, home: _Force, destination: str, reason: Reason,
                  rule: str) -> Decision:
        key = (service, home.id, destination, reason, rule)
        decision = self._decisions.get(key)
        if decision is None:
            sip = self._forces[destination].sip[service]
            decision = self._decisions[key] = Decision(service, home.id, destination, sip,
                                                       reason, rule)
        return decision

    def _home_share(self, home: _Force, service: Service, view: CentreView, ledger: Ledger,
                    now: float) -> tuple[float, Reason, str]:
        """How much of this traffic home keeps now (1, 0 or a ramp step) and, for the rest, why."""
        state = view.state
        if state is _DOWN or not view.telephony_up:
            return 0.0, Reason.ORIGIN_DOWN, "state:down"
        if state is _DRAINING:
            return 0.0, Reason.ORIGIN_DRAINING, "state:draining"
        if not view.cad_up and home.cad_down_overflows:
            return 0.0, Reason.ORIGIN_CAD_DOWN, home.rule_cad_down
        if state is _RECOVERING:
            step = min(int(max(now - view.since, 0.0) / self._ramp_step_s), len(self._ramp) - 1)
            return self._ramp[step], Reason.ORIGIN_RECOVERING, self._ramp_rules[step]
        queue = self._queue(home, view, ledger)
        if state is _OVERLOADED:
            if queue < home.overflow_queue:
                return 1.0, Reason.HOME, home.rule_overflow_queue
            return 0.0, Reason.ORIGIN_OVERLOADED, home.rule_overflow_queue
        if queue < home.max_queue:
            if not view.cad_up:
                return 1.0, Reason.HOME, home.rule_cad_down
            return 1.0, Reason.HOME, _STATE_RULES[state]
        return 0.0, Reason.ORIGIN_OVERLOADED, home.rule_max_queue

    @staticmethod
    def _queue(force: _Force, view: CentreView, ledger: Ledger) -> int:
        """Calls waiting: the larger of our own count and the centre's telemetry, since each can
        lag the other (the router does not see every call; telemetry arrives every few seconds)."""
        queue = ledger.in_flight.get(force.id, 0) - force.handlers
        waiting = view.calls_waiting
        return waiting if waiting is not None and waiting > queue else queue

    def _can_aid(self, partner: _Partner, service: Service, origin: str, snapshot: Snapshot,
                 ledger: Ledger) -> bool:
        view = snapshot.get(partner.to)
        if view.state is not _NORMAL or not view.telephony_up or not view.cad_up:
            return False
        force = self._forces[partner.to]
        limit = force.aid_max if service is _999 else force.aid_max_101
        if ledger.aid.get(partner.to, 0) >= limit:
            return False
        cap = partner.route_cap
        if cap is not None and ledger.aid_from.get((partner.to, origin), 0) >= cap:
            return False
        return self._queue(force, view, ledger) < force.aid_queue_below

    def _pick_partner(self, home: _Force, service: Service, snapshot: Snapshot,
                      ledger: Ledger) -> _Partner | None:
        """Smooth weighted round robin (as nginx does) over the partners able to help now."""
        routes = home.routes[service]
        current = self._wrr[(home.id, service)]
        best = -1
        total = 0
        standby: _Partner | None = None
        for i, partner in enumerate(routes):
            if not self._can_aid(partner, service, home.id, snapshot, ledger):
                continue
            if partner.weight == 0:
                standby = standby or partner
                continue
            current[i] += partner.weight
            total += partner.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return standby
        current[best] -= total
        return routes[best]

    def _last_resort(self, home: _Force, snapshot: Snapshot, ledger: Ledger) -> Decision:
        """A 999 with nowhere under the rules: the least-loaded centre known to be reachable."""
        near = [home.id, *(p.to for p in home.routes[_999])]
        for candidates in (near, list(self._forces)):
            best, best_load = None, 0.0
            for fid in candidates:
                view = snapshot.get(fid)
                if view.state not in _REACHABLE or not view.telephony_up:
                    continue
                force = self._forces[fid]
                load = ledger.in_flight.get(fid, 0) / max(force.capacity, 1)
                if best is None or load < best_load:
                    best, best_load = force, load
            if best is not None:
                return self._decision(_999, home, best.id, Reason.LAST_RESORT,
                                      "last_resort:least_loaded")
        return Decision(_999, home.id, home.id, home.sip[_999], Reason.LAST_RESORT,
                        "last_resort:none_reachable")

    @staticmethod
    def _shed(home: _Force, view: CentreView) -> Decision:
        svc = Service.NON_EMERGENCY
        rule = f"forces.{home.id}.centre.shed_101"
        if view.state in (_DOWN, _DRAINING) or not view.telephony_up:
            return Decision(svc, home.id, home.id, home.shed_announcement, Reason.SHED,
                            f"{rule}.announcement", "announcement")
        return Decision(svc, home.id, home.id, home.shed_queue, Reason.SHED, f"{rule}.queue",
                        "queue")

    # ---- the plan, for dashboards and MQTT ------------------------------------------------

    def plan(self, service: Service, origin: str, snapshot: Snapshot, ledger: Ledger,
             now: float) -> list[Share]:
        """Current shares of `origin`'s `service` calls, without changing any selection state."""
        home = self._forces[origin]
        view = snapshot.get(origin)
        share, reason, rule = self._home_share(home, service, view, ledger, now)
        out = [Share(origin, share, Reason.HOME, rule)] if share > 0 else []
        if share >= 1.0:
            return out
        able = [p for p in home.routes[service]
                if self._can_aid(p, service, origin, snapshot, ledger)]
        weighted = [p for p in able if p.weight > 0] or able[:1]
        total = sum(p.weight for p in weighted) or 1
        rest = 1.0 - share
        out += [Share(p.to, rest * (p.weight or total) / total, reason, p.rule) for p in weighted]
        if not weighted:
            fallback = self._last_resort(home, snapshot, ledger) if service is _999 \
                else self._shed(home, view)
            out.append(Share(fallback.destination, rest, fallback.reason, fallback.rule))
        return out
