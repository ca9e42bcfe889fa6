"""How calls are routed in a run: the interface every strategy fills, and the two without the
router — `none` (every call goes home, dead line or not) and `manual` (diversion set up and
taken down by hand, late and without caps). The router itself is router/tools/sim/in_loop.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.config import RouterConfig
from router.engine.model import Service
from router.tools.sim.queueing import Call, Centre
from router.tools.sim.scenario import Scenario
from router.tools.sim.tally import Tally
from router.tools.sim.truth import phones_down

Action = Callable[[Any, float], None]  # (argument, now)


class Loop(Protocol):
    """What a strategy may use of the run: the setting, the centres' truth, and the clock."""

    config: RouterConfig
    scenario: Scenario
    seed: int
    centres: dict[str, Centre]

    def at(self, t: float, action: Action, arg: Any = None) -> None:
        """Run `action(arg, t)` at virtual time `t`."""


@dataclass(slots=True)
class Outage:
    """A centre's phones (or CAD) really down, and when the routing noticed and let go."""

    force: str
    component: str  # telephony or cad
    from_s: float
    to_s: float | None = None
    detected_after_s: float | None = None  # from the failure to calls going elsewhere
    restored_after_s: float | None = None  # from the repair to the routing counting it back

    def as_json(self) -> dict[str, object]:
        return {"force": self.force, "component": self.component, "from_s": self.from_s,
                "to_s": self.to_s, "detected_after_s": _round(self.detected_after_s),
                "restored_after_s": _round(self.restored_after_s)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Strategy:
    """Where each call goes. The default keeps every call at home."""

    name = "none"

    def __init__(self, loop: Loop):
        self.loop = loop
        self.outages: list[Outage] = []

    def start(self) -> None:
        """Schedule what the strategy does by itself (probes, telemetry, hand diversions)."""

    def route(self, call: Call, now: float, tally: Tally) -> str | None:
        """The centre that gets the call, or None: an announcement (shed)."""
        return call.caller.origin

    def ended(self, call: Call, now: float) -> None:
        """The call is over (answered and done, abandoned, or cut off)."""

    def phones(self, force: str, up: bool, now: float) -> None:
        """The truth changed: a centre's phones failed or came back."""

    def cad(self, force: str, up: bool, now: float) -> None:
        """The truth changed: a centre's CAD failed or came back."""

    def external_aid(self, force: str, delta: int, now: float) -> None:
        """Calls for a force outside the scenario started (+) or ended (-) at `force`."""

    def belief(self, force: str, now: float) -> str:
        """How the routing sees the centre now, for the charts."""
        return ""


class NoDiversion(Strategy):
    name = "none"


class Manual(Strategy):
    """Once a centre's phones fail, after `manual.delay_s` every call of that force goes to its
    partners by weight (smooth weighted round robin), with no caps and no regard to how busy
    they are, until the phones are back plus `manual.return_delay_s` (or `return_at_s`)."""

    name = "manual"

    def __init__(self, loop: Loop):
        super().__init__(loop)
        m = loop.scenario.manual
        self._partners: dict[str, list[tuple[str, int]]] = {}
        for fid, force in loop.config.forces.items():
            named = m.partners.get(fid)
            routes = force.overflow[Service.EMERGENCY]
            # by hand, the weighted partners share the calls; standby ones only if none is
            weighted = [(r.to, r.share_weight) for r in routes if r.share_weight > 0]
            self._partners[fid] = list(named.items()) if named else weighted or [
                (r.to, 1) for r in routes]
        self._wrr = {fid: [0] * len(p) for fid, p in self._partners.items()}
        self._diverting: set[str] = set()

    def start(self) -> None:
        m, sc = self.loop.scenario.manual, self.loop.scenario
        for fid in self.loop.config.forces:
            for down_at, up_at in phones_down(sc, fid):
                begin = down_at + m.delay_s
                end = m.return_at_s.get(fid, up_at + m.return_delay_s)
                diverts = begin < min(end, sc.duration_s) and bool(self._partners[fid])
                back = up_at if up_at < sc.duration_s else None
                self.outages.append(Outage(
                    fid, "telephony", down_at, back, m.delay_s if diverts else None,
                    end - up_at if diverts and back is not None and end < sc.duration_s
                    else 0.0 if back is not None and not diverts else None))
                if diverts:
                    self.loop.at(begin, self._divert, (fid, True))
                    if end < sc.duration_s:
                        self.loop.at(end, self._divert, (fid, False))

    def _divert(self, arg: tuple[str, bool], now: float) -> None:
        fid, on = arg
        if on:
            self._diverting.add(fid)
        else:
            self._diverting.discard(fid)

    def route(self, call: Call, now: float, tally: Tally) -> str | None:
        origin = call.caller.origin
        if origin not in self._diverting:
            return origin
        partners, current = self._partners[origin], self._wrr[origin]
        best, total = 0, 0
        for i, (_, weight) in enumerate(partners):
            current[i] += weight
            total += weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return partners[best][0]

    def belief(self, force: str, now: float) -> str:
        return "diverted by hand" if force in self._diverting else ""
