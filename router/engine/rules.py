"""The policy's facts, written once: what a centre keeps, why it diverts, what a partner gives.

`Policy` decides each call with these; the alerts sent to partners, the HTTP API, the
dashboard, `status`, MQTT and the simulator ask the same functions, so no view can say a force
keeps its calls while the policy sends them elsewhere. Pure: no I/O, `now` is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from router.config import MutualAid, RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Reason, Service, ShedAction, Snapshot

_NORMAL = CentreState.NORMAL
_OVERLOADED = CentreState.OVERLOADED
_DOWN = CentreState.DOWN
_DRAINING = CentreState.DRAINING
_RECOVERING = CentreState.RECOVERING
_999 = Service.EMERGENCY
REACHABLE = frozenset({_NORMAL, _OVERLOADED, _RECOVERING})  # may take a last-resort 999


class Cause(StrEnum):
    """Why a centre's calls go to partners, in a control room's words."""

    DECLARED = "declared"  # a manager declared the centre down, draining, overloaded...
    DOWN = "down"  # phones down (probes or telemetry)
    DRAINING = "draining"
    CAD_DOWN = "cad_down"  # phones up, CAD down, and the centre's rule is to overflow
    OVERLOADED = "overloaded"  # its queue is past overflow_queue (overloaded) or max_queue
    RECOVERING = "recovering"  # back after down: a ramp share returns home


_CAUSE = {Reason.ORIGIN_DOWN: Cause.DOWN, Reason.ORIGIN_DRAINING: Cause.DRAINING,
          Reason.ORIGIN_CAD_DOWN: Cause.CAD_DOWN, Reason.ORIGIN_OVERLOADED: Cause.OVERLOADED,
          Reason.ORIGIN_RECOVERING: Cause.RECOVERING}
_STATE_REASON = {_DOWN: Reason.ORIGIN_DOWN, _DRAINING: Reason.ORIGIN_DRAINING,
                 _OVERLOADED: Reason.ORIGIN_OVERLOADED, _RECOVERING: Reason.ORIGIN_RECOVERING}


@dataclass(frozen=True, slots=True)
class HomeShare:
    """How much of a force's traffic its own centre keeps now, and why the rest goes."""

    share: float  # 1 keeps every call, 0 none, in between: a recovery ramp step
    reason: Reason  # for the calls that go elsewhere; HOME while it keeps them all
    rule: str  # the config key or state behind it
    cause: Cause | None = None  # None while it keeps every call

    @property
    def diverting(self) -> bool:
        return self.share < 1.0

    def as_json(self) -> dict[str, object]:
        return {"cause": self.cause.value if self.cause else None,
                "share_diverted": round(1.0 - self.share, 4),
                "reason": self.reason.value, "rule": self.rule}


_KEEP = {s: HomeShare(1.0, Reason.HOME, f"state:{s.value}") for s in CentreState}


def aid_cap(aid: MutualAid, service: Service) -> int:
    """Calls a force takes for others at once: 101 may not use the 999 reserve."""
    return aid.max_concurrent if service is _999 else aid.max_concurrent - aid.reserve_999


@dataclass(frozen=True, slots=True)
class PartnerRoute:
    to: str
    weight: int
    route_cap: int | None
    rule: str


@dataclass(frozen=True, slots=True)
class ForceRules:
    """One force's rules, compiled once per config: read on every call."""

    id: str
    handlers: int
    overflow_queue: int
    max_queue: int
    cad_down_overflows: bool
    sip: Mapping[Service, str]
    shed: Mapping[ShedAction, str]
    routes: Mapping[Service, tuple[PartnerRoute, ...]]
    aid_cap: Mapping[Service, int]
    aid_queue_below: int
    # rule names, built once: a decision names the rule that made it on every call
    rule_cad_down: str
    rule_overflow_queue: str
    rule_max_queue: str

    @property
    def capacity(self) -> int:
        return self.handlers + self.max_queue


def compile_force(config: RouterConfig, fid: str) -> ForceRules:
    f = config.forces[fid]
    c = f.centre
    return ForceRules(
        fid, c.handlers_on_duty, c.overflow_queue, c.max_queue, c.on_cad_down == "overflow",
        dict(f.sip), {"queue": c.shed_101.queue, "announcement": c.shed_101.announcement},
        {s: tuple(PartnerRoute(r.to, r.share_weight, r.max_concurrent,
                               f"forces.{fid}.overflow.{s.value}[{i}]")
                  for i, r in enumerate(f.overflow[s])) for s in Service},
        {s: aid_cap(f.mutual_aid, s) for s in Service}, f.mutual_aid.only_while_queue_below,
        rule_cad_down=f"forces.{fid}.centre.on_cad_down",
        rule_overflow_queue=f"forces.{fid}.centre.overflow_queue",
        rule_max_queue=f"forces.{fid}.centre.max_queue")


class Rules:
    """Every force's compiled rules and the facts the policy decides by."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.forces = {fid: compile_force(config, fid) for fid in config.forces}
        recovery = config.health.recovery
        self._ramp, self._ramp_step_s = recovery.ramp, recovery.step_s
        self._ramp_rules = [f"health.recovery.ramp[{i}]" for i in range(len(self._ramp))]
        # Answers are immutable and the same few recur call after call, so each is built once:
        # building a frozen dataclass per call cost a fifth of a decision
        self._made: dict[tuple[float, Reason, str, Cause | None], HomeShare] = {}

    def _share(self, share: float, reason: Reason, rule: str,
               cause: Cause | None = None) -> HomeShare:
        key = (share, reason, rule, cause)
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = HomeShare(share, reason, rule, cause)
        return made

    def queue(self, force: ForceRules, view: CentreView, ledger: Ledger) -> int:
        """Calls waiting: the larger of the routers' count and the centre's telemetry, since each
        can lag the other (routers do not see every call; telemetry comes every few seconds)."""
        queue = ledger.total_in_flight.get(force.id, 0) - force.handlers
        waiting = view.calls_waiting
        return waiting if waiting is not None and waiting > queue else queue

    def home_share(self, home: ForceRules, view: CentreView, ledger: Ledger,
                   now: float) -> HomeShare:
        """How much of its traffic home keeps now (1, 0 or a ramp step) and, for the rest, why.

        In order: phones down or `down`, `draining`, CAD down with `on_cad_down: overflow`,
        `recovering` (ramp), `overloaded` past `overflow_queue`, any state past `max_queue`."""
        state = view.state
        if state is _DOWN or not view.telephony_up:
            return self._away(view, Reason.ORIGIN_DOWN, "state:down")
        if state is _DRAINING:
            return self._away(view, Reason.ORIGIN_DRAINING, "state:draining")
        if not view.cad_up and home.cad_down_overflows:
            return self._away(view, Reason.ORIGIN_CAD_DOWN, home.rule_cad_down)
        if state is _RECOVERING:
            step = min(int(max(now - view.since, 0.0) / self._ramp_step_s), len(self._ramp) - 1)
            if self._ramp[step] >= 1.0:
                return self._share(1.0, Reason.HOME, self._ramp_rules[step])
            return self._away(view, Reason.ORIGIN_RECOVERING, self._ramp_rules[step],
                              self._ramp[step])
        queue = self.queue(home, view, ledger)
        if state is _OVERLOADED:
            if queue < home.overflow_queue:
                return self._share(1.0, Reason.HOME, home.rule_overflow_queue)
            return self._away(view, Reason.ORIGIN_OVERLOADED, home.rule_overflow_queue)
        if queue < home.max_queue:
            if view.cad_up:
                return _KEEP[state]  # the common case, by far: no allocation, no lookup
            return self._share(1.0, Reason.HOME, home.rule_cad_down)
        return self._away(view, Reason.ORIGIN_OVERLOADED, home.rule_max_queue)

    def _away(self, view: CentreView, reason: Reason, rule: str,
              share: float = 0.0) -> HomeShare:
        # the manager's doing when the declared state is what sends calls away; evidence that
        # contradicts a declaration (phones down under a declared `normal`) keeps its own cause
        declared = view.declared and _STATE_REASON.get(view.state) is reason
        return self._share(share, reason, rule, Cause.DECLARED if declared else _CAUSE[reason])

    def can_aid(self, route: PartnerRoute, service: Service, origin: str, snapshot: Snapshot,
                ledger: Ledger) -> bool:
        """A partner helps while `normal` with phones and CAD up, under its mutual-aid cap for
        the service, under the route's own cap, and with its queue below its threshold."""
        view = snapshot.get(route.to)
        if view.state is not _NORMAL or not view.telephony_up or not view.cad_up:
            return False
        force = self.forces[route.to]
        if ledger.total_aid.get(route.to, 0) >= force.aid_cap[service]:
            return False
        cap = route.route_cap
        if cap is not None and ledger.total_aid_from.get((route.to, origin), 0) >= cap:
            return False
        return self.queue(force, view, ledger) < force.aid_queue_below

    @staticmethod
    def reachable(view: CentreView) -> bool:
        """May take a last-resort 999: answering its phones, whatever its load."""
        return view.state in REACHABLE and view.telephony_up

    @staticmethod
    def shed_action(view: CentreView) -> ShedAction:
        """A shed 101 waits in the home queue, or hears an announcement when home is closed."""
        closed = view.state in (_DOWN, _DRAINING) or not view.telephony_up
        return "announcement" if closed else "queue"

    def headroom(self, force: str, ledger: Ledger) -> dict[Service, int]:
        """Calls a force could still take for others, per service."""
        aid = ledger.total_aid.get(force, 0)
        return {s: max(cap - aid, 0) for s, cap in self.forces[force].aid_cap.items()}


def headline(state: CentreState, home: HomeShare) -> str:
    """A centre in a few words, as the board, `status` and the demo show it: its state while
    it keeps its calls (`normal`), else that and how much it diverts (`down — diverting`,
    `recovering — diverting 75%`). When the state is not the cause, the cause replaces it, so a
    centre whose CAD is down never reads `normal` while its calls go away."""
    if not home.diverting or home.cause is None:
        return state.value
    diverted = round((1.0 - home.share) * 100)
    what = "diverting" if diverted >= 100 else f"diverting {diverted}%"
    if home.cause is Cause.CAD_DOWN:
        return f"{what} — CAD down"
    if home.cause is Cause.OVERLOADED and state is not _OVERLOADED:
        return f"{what} — queue full"
    if home.cause is Cause.DOWN and state is not _DOWN:
        return f"{what} — phones down"
    return f"{state.value} — {what}" + (" (declared)" if home.cause is Cause.DECLARED else "")


def diversion_json(state: CentreState, home: HomeShare) -> dict[str, object]:
    """What every view (API, dashboard, MQTT state) says of a force's diversion."""
    return {"diverting": home.diverting, "diversion": home.as_json() if home.diverting else None,
            "headline": headline(state, home)}
