"""The real router in the loop: the real `Policy` and `Ledger` decide every call, and the real
`CentreHealth` state machine of each centre is fed, in virtual time, what the live watcher
would feed it — probe results on their intervals with jitter (a failed probe reports after its
timeout), the centre's telemetry every few seconds (derived from the queueing model: calls
waiting, handlers free, oldest wait, phones and CAD), managers' declarations, and `tick` at
each deadline it names. So detection delay, overload from load, flap damping and the recovery
ramp are part of the result, and the router only ever knows what this evidence told it.

Probes are run one by one from each change of the truth until the machine has seen enough
agreeing results to settle (the larger threshold); between changes every probe would give the
same answer, which changes nothing, so they rest. After a change the first probe comes
uniformly within one interval (the phase of a jittered schedule that has run for a while).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot
from router.engine.policy import Policy
from router.engine.rules import headline
from router.tools.sim.queueing import Call
from router.tools.sim.scenario import Declaration
from router.tools.sim.strategies import Loop, Outage, Strategy
from router.tools.sim.tally import Tally
from router.watch.health import CentreHealth, Component, Override, Transition, probe_id
from router.watch.telemetry import Telemetry

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # telemetry's `ts`: the machine is given its age
_LAST_RESORT, _SHED = Reason.LAST_RESORT, Reason.SHED
_DOWN, _NORMAL, _OVERLOADED = CentreState.DOWN, CentreState.NORMAL, CentreState.OVERLOADED


@dataclass(slots=True)
class _Probe:
    force: str
    pid: str
    component: Component
    interval: float
    timeout: float
    next_at: float = 0.0
    active: bool = False
    streak: int = 0  # results agreeing with the truth since it last changed


class RouterInLoop(Strategy):
    name = "overflow-router"

    def __init__(self, loop: Loop):
        super().__init__(loop)
        cfg = loop.config
        health = cfg.health
        self.policy, self.ledger = Policy(cfg), Ledger()
        self.machines = {fid: CentreHealth(fid, health, f.centre) for fid, f in cfg.forces.items()}
        self.snapshot = Snapshot({fid: m.view for fid, m in self.machines.items()})
        self._rng = random.Random(f"{loop.seed}/router")
        self._jitter = health.jitter
        self._settled = max(health.unhealthy_threshold, health.healthy_threshold)
        self._probes = {fid: [_Probe(fid, probe_id(p), Component(p.component),
                                     p.interval_s or health.interval_s,
                                     p.timeout_s or health.timeout_s)
                              for p in f.centre.probes] for fid, f in cfg.forces.items()}
        self._due: dict[str, float | None] = dict.fromkeys(cfg.forces)
        self._open: dict[tuple[str, Component], Outage] = {}
        self._external: dict[str, list[str]] = {fid: [] for fid in cfg.forces}
        self._announcement_s = loop.scenario.announcement_s

    # ---- evidence -----------------------------------------------------------------------

    def start(self) -> None:
        """Before the night every centre was well and the router had seen it."""
        interval = self.loop.scenario.telemetry_interval_s
        for fid, machine in self.machines.items():
            for probe in self._probes[fid]:
                for _ in range(self._settled):
                    machine.probe_result(probe.pid, True, 0.0)
                probe.streak = self._settled
            if self.loop.config.forces[fid].centre.telemetry:
                self._publish(fid, 0.0)
                self.loop.at(self._rng.uniform(0, interval), self._telemetry, fid)
            self._apply(fid, None, 0.0)
        for declaration in self.loop.scenario.declarations:
            self.loop.at(declaration.at_s, self._declare, declaration)

    def phones(self, force: str, up: bool, now: float) -> None:
        self._truth_changed(force, Component.TELEPHONY, up, now)

    def cad(self, force: str, up: bool, now: float) -> None:
        self._truth_changed(force, Component.CAD, up, now)

    def _truth_changed(self, force: str, component: Component, up: bool, now: float) -> None:
        key = (force, component)
        if not up and key not in self._open:
            self._open[key] = outage = Outage(force, component.value, now)
            self.outages.append(outage)
        elif up and key in self._open:
            self._open[key].to_s = now
        for probe in self._probes[force]:
            if probe.component is component:
                probe.streak = 0
                if not probe.active:
                    probe.active = True
                    probe.next_at = now + self._rng.uniform(0, probe.interval)
                    self.loop.at(probe.next_at, self._probe, probe)

    def _up(self, force: str, component: Component) -> bool:
        centre = self.loop.centres[force]
        return centre.phones_up if component is Component.TELEPHONY else centre.cad_up

    def _probe(self, probe: _Probe, now: float) -> None:
        if probe.streak >= self._settled:
            probe.active = False  # settled: it would only repeat itself
            return
        if self._up(probe.force, probe.component):
            self._probe_result((probe, True), now)
        else:
            self.loop.at(now + probe.timeout, self._probe_result, (probe, False))
        jitter = self._rng.uniform(-self._jitter, self._jitter)
        probe.next_at = max(probe.next_at + probe.interval * (1 + jitter), now)
        self.loop.at(probe.next_at, self._probe, probe)

    def _probe_result(self, arg: tuple[_Probe, bool], now: float) -> None:
        probe, ok = arg
        agrees = ok == self._up(probe.force, probe.component)
        probe.streak = probe.streak + 1 if agrees else 0
        machine = self.machines[probe.force]
        detail = "" if ok else f"timeout after {probe.timeout:g}s"
        self._apply(probe.force, machine.probe_result(probe.pid, ok, now, detail), now)

    def _telemetry(self, force: str, now: float) -> None:
        if not self.loop.centres[force].silent:
            self._publish(force, now)
        self.loop.at(now + self.loop.scenario.telemetry_interval_s, self._telemetry, force)

    def _publish(self, force: str, now: float) -> None:
        c = self.loop.centres[force]
        reading = Telemetry.model_construct(
            ts=_EPOCH, telephony_up=c.phones_up, cad_up=c.cad_up, calls_waiting=c.calls_waiting,
            handlers_available=c.handlers_available, handlers_on_duty=c.handlers,
            oldest_wait_s=c.oldest_wait(now))
        self._apply(force, self.machines[force].telemetry(reading, now, now), now)

    def _declare(self, d: Declaration, now: float) -> None:
        machine = self.machines[d.force]
        if d.clear:
            transition = machine.clear(now)
        else:
            assert d.state is not None  # validated: a state or clear
            expires = now + d.for_s if d.for_s is not None else None
            transition = machine.declare(Override(d.state, d.reason, "scenario", now, expires),
                                         now)
        self._apply(d.force, transition, now)

    def _tick(self, force: str, now: float) -> None:
        if self._due[force] != now:
            return  # superseded by an earlier or later deadline
        self._due[force] = None
        self._apply(force, self.machines[force].tick(now), now)

    def _apply(self, force: str, transition: Transition | None, now: float) -> None:
        """As the watcher does: a changed view is swapped into a new snapshot whole."""
        machine = self.machines[force]
        view = machine.view
        if self.snapshot.centres.get(force) != view:
            self.snapshot = self.snapshot.with_centre(force, view)
            if self._open:
                self._notice(force, view, now)
        due = machine.next_deadline(now)
        if due is not None and due != self._due[force]:
            self._due[force] = due
            self.loop.at(due, self._tick, force)

    def _notice(self, force: str, view: CentreView, now: float) -> None:
        for component in Component:
            outage = self._open.get((force, component))
            if outage is None:
                continue
            if component is Component.TELEPHONY:
                down = view.state is _DOWN or not view.telephony_up
                back = view.telephony_up and view.state in (_NORMAL, _OVERLOADED)
            else:
                down, back = not view.cad_up, view.cad_up
            if outage.detected_after_s is None and outage.to_s is None and down:
                outage.detected_after_s = now - outage.from_s
            if outage.to_s is not None and back:
                outage.restored_after_s = now - outage.to_s
                del self._open[(force, component)]

    # ---- calls --------------------------------------------------------------------------

    def route(self, call: Call, now: float, tally: Tally) -> str | None:
        caller = call.caller
        decision = self.policy.decide(caller.service, caller.origin, self.snapshot, self.ledger,
                                      now)
        self.ledger.add(call.id, decision, now)
        if decision.reason is _LAST_RESORT:
            tally.last_resort += 1
        elif decision.reason is _SHED and decision.action == "announcement":
            self.loop.at(now + self._announcement_s, self._hang_up, call.id)
            return None
        return decision.destination

    def _hang_up(self, call_id: str, now: float) -> None:
        self.ledger.end(call_id)

    def ended(self, call: Call, now: float) -> None:
        self.ledger.end(call.id)

    def external_aid(self, force: str, delta: int, now: float) -> None:
        held = self._external[force]
        sip = self.loop.config.forces[force].sip[Service.EMERGENCY]
        for _ in range(delta):
            held.append(f"external-{force}-{len(held)}-{now:g}")
            self.ledger.add(held[-1], Decision(Service.EMERGENCY, "outside", force, sip,
                                               Reason.ORIGIN_DOWN, "scenario.external_aid"), now)
        for _ in range(-delta):
            self.ledger.end(held.pop())

    def belief(self, force: str, now: float) -> str:
        home = self.policy.home_share(force, self.snapshot, self.ledger, now)
        return headline(self.snapshot.get(force).state, home)
