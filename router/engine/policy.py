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

from dataclasses import dataclass

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import Decision, Reason, Service, Snapshot
from router.engine.rules import ForceRules, HomeShare, PartnerRoute, Rules

_999 = Service.EMERGENCY


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
        self.rules = Rules(config)
        self._forces = self.rules.forces
        self._home_share = self.rules.home_share  # bound once: it runs on every call
        # Decisions are immutable and the same few recur call after call (a handful per route),
        # so each is built once: building a frozen dataclass was most of a decision's cost
        self._decisions: dict[tuple[Service, str, str, Reason, str], Decision] = {}
        self._wrr = {(fid, s): [0] * len(f.routes[s])
                     for fid, f in self._forces.items() for s in Service}
        self._credit: dict[tuple[str, Service], float] = {}

    # ---- the per-call decision ------------------------------------------------------------

    def decide(self, service: Service, origin: str, snapshot: Snapshot, ledger: Ledger,
               now: float) -> Decision:
        home = self._forces[origin]
        view = snapshot.get(origin)
        keep = self._home_share(home, view, ledger, now)
        if keep.share >= 1.0:
            return self._decision(service, home, origin, Reason.HOME, keep.rule)
        if keep.share > 0.0:  # recovering: smooth ramp, one home call per 1/share calls
            key = (origin, service)
            credit = self._credit.get(key, 0.0) + keep.share
            if credit >= 1.0 - 1e-9:
                self._credit[key] = credit - 1.0
                return self._decision(service, home, origin, Reason.HOME, keep.rule)
            self._credit[key] = credit
        partner = self._pick_partner(home, service, snapshot, ledger)
        if partner is not None:
            return self._decision(service, home, partner.to, keep.reason, partner.rule)
        if service is _999:
            return self._last_resort(home, snapshot, ledger)
        return self._shed(home, snapshot)

    def home_share(self, origin: str, snapshot: Snapshot, ledger: Ledger,
                   now: float) -> HomeShare:
        """What `origin`'s centre keeps now and why the rest goes (for every view to ask)."""
        return self.rules.home_share(self._forces[origin], snapshot.get(origin), ledger, now)

    def _decision(self, service: Service, home: ForceRules, destination: str, reason: Reason,
                  rule: str) -> Decision:
        key = (service, home.id, destination, reason, rule)
        decision = self._decisions.get(key)
        if decision is None:
            sip = self._forces[destination].sip[service]
            decision = self._decisions[key] = Decision(service, home.id, destination, sip,
                                                       reason, rule)
        return decision

    def _pick_partner(self, home: ForceRules, service: Service, snapshot: Snapshot,
                      ledger: Ledger) -> PartnerRoute | None:
        """Smooth weighted round robin (as nginx does) over the partners able to help now."""
        routes = home.routes[service]
        current = self._wrr[(home.id, service)]
        best = -1
        total = 0
        standby: PartnerRoute | None = None
        can_aid = self.rules.can_aid
        for i, partner in enumerate(routes):
            if not can_aid(partner, service, home.id, snapshot, ledger):
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

    def _last_resort(self, home: ForceRules, snapshot: Snapshot, ledger: Ledger) -> Decision:
        """A 999 with nowhere under the rules: the least-loaded centre known to be reachable."""
        near = [home.id, *(p.to for p in home.routes[_999])]
        for candidates in (near, list(self._forces)):
            best, best_load = None, 0.0
            for fid in candidates:
                if not self.rules.reachable(snapshot.get(fid)):
                    continue
                force = self._forces[fid]
                load = ledger.total_in_flight.get(fid, 0) / max(force.capacity, 1)
                if best is None or load < best_load:
                    best, best_load = force, load
            if best is not None:
                return self._decision(_999, home, best.id, Reason.LAST_RESORT,
                                      "last_resort:least_loaded")
        return Decision(_999, home.id, home.id, home.sip[_999], Reason.LAST_RESORT,
                        "last_resort:none_reachable")

    def _shed(self, home: ForceRules, snapshot: Snapshot) -> Decision:
        action = self.rules.shed_action(snapshot.get(home.id))
        return Decision(Service.NON_EMERGENCY, home.id, home.id, home.shed[action], Reason.SHED,
                        f"forces.{home.id}.centre.shed_101.{action}", action)

    # ---- the plan, for dashboards and MQTT ------------------------------------------------

    def plan(self, service: Service, origin: str, snapshot: Snapshot, ledger: Ledger,
             now: float) -> list[Share]:
        """Current shares of `origin`'s `service` calls, without changing any selection state."""
        home = self._forces[origin]
        keep = self.rules.home_share(home, snapshot.get(origin), ledger, now)
        share = keep.share
        out = [Share(origin, share, Reason.HOME, keep.rule)] if share > 0 else []
        if share >= 1.0:
            return out
        able = [p for p in home.routes[service]
                if self.rules.can_aid(p, service, origin, snapshot, ledger)]
        weighted = [p for p in able if p.weight > 0] or able[:1]
        total = sum(p.weight for p in weighted) or 1
        rest = 1.0 - share
        out += [Share(p.to, rest * (p.weight or total) / total, keep.reason, p.rule)
                for p in weighted]
        if not weighted:
            fallback = self._last_resort(home, snapshot, ledger) if service is _999 \
                else self._shed(home, snapshot)
            out.append(Share(fallback.destination, rest, fallback.reason, fallback.rule))
        return out
