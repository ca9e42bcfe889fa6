"""One night under one strategy: a discrete-event simulation in virtual time.

No sleeping and no wall clock, so a 12-hour night of eight forces replays in seconds and the
same seed always gives the same result. The callers are given (drawn once per seed, shared by
every strategy); the run routes each call with the strategy, queues it at the centre it was
sent to, and lets callers be answered, give up and call again, while the scenario's truth
(phones, CAD, staff) changes under everyone.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.config import RouterConfig
from router.engine.model import Service
from router.engine.rules import aid_cap
from router.tools.sim.callers import GIVES_UP, Caller
from router.tools.sim.in_loop import RouterInLoop
from router.tools.sim.queueing import GONE, WAITING, Call, Centre
from router.tools.sim.scenario import Scenario
from router.tools.sim.strategies import Action, Manual, NoDiversion, Outage, Strategy
from router.tools.sim.tally import BIN_S, WITHIN_S, Samples, Tally
from router.tools.sim.truth import change_times, handlers_at, truth_at

STRATEGIES: dict[str, Callable[[Any], Strategy]] = {
    "overflow-router": RouterInLoop, "manual": Manual, "none": NoDiversion}

# order of events at one instant: free handlers first, then the truth, then the router's own
# inputs, then callers giving up, then new calls, then samples of the result
_END, _TRUTH, _ACT, _ABANDON, _ARRIVE, _SAMPLE = range(6)


@dataclass
class Outcome:
    """What one strategy gave over the night."""

    strategy: str
    tallies: dict[tuple[str, Service], Tally]
    centres: dict[str, Centre]
    samples: dict[str, Samples]
    outages: list[Outage]
    calls: int
    events: int


class Run:
    def __init__(self, config: RouterConfig, scenario: Scenario, seed: int, strategy: str):
        self.config, self.scenario, self.seed = config, scenario, seed
        self.centres = {fid: Centre(fid, f.centre.handlers_on_duty,
                                    aid_cap(f.mutual_aid, Service.EMERGENCY))
                        for fid, f in config.forces.items()}
        bins = int(scenario.duration_s // BIN_S) + 1
        self.tallies = {(fid, s): Tally(fid, s.value, bins) for fid in config.forces
                        for s in Service}
        self.samples = {fid: Samples() for fid in config.forces}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self.strategy = STRATEGIES[strategy](self)

    def at(self, t: float, action: Action, arg: Any = None) -> None:
        heapq.heappush(self._heap, (t, _ACT, next(self._seq), (action, arg)))

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._heap, (t, kind, next(self._seq), payload))

    # ---- the loop -----------------------------------------------------------------------

    def run(self, callers: list[tuple[float, Caller]]) -> Outcome:
        sc = self.scenario
        for fid in self.config.forces:
            for t in change_times(sc, fid):
                self._push(t, _TRUTH, fid)
        t = 0.0
        while t < sc.duration_s:
            self._push(t, _SAMPLE, None)
            t += sc.sample_s
        self.strategy.start()
        heap, pop, end = self._heap, heapq.heappop, sc.duration_s
        n, i, events = len(callers), 0, 0
        while True:
            if i < n and (not heap or callers[i][0] < heap[0][0]):
                now, caller = callers[i]
                i += 1
                events += 1
                self._arrive(Call(str(next(self._ids)), caller, 0, now), now)
                continue
            if not heap or heap[0][0] >= end:
                break
            now, kind, _, payload = pop(heap)
            events += 1
            if kind == _END:
                self._end(payload, now)
            elif kind == _ACT:
                payload[0](payload[1], now)
            elif kind == _ABANDON:
                self._abandon(payload, now)
            elif kind == _ARRIVE:
                caller, attempt = payload
                self._arrive(Call(str(next(self._ids)), caller, attempt, now), now)
            elif kind == _TRUTH:
                self._truth(payload, now)
            else:
                self._sample(now)
        return self._finish(events)

    # ---- calls --------------------------------------------------------------------------

    def _arrive(self, call: Call, now: float) -> None:
        caller = call.caller
        tally = self.tallies[(caller.origin, caller.service)]
        tally.offered += 1
        tally.offered_bins[int(now) // BIN_S] += 1
        if call.attempt:
            tally.repeats += 1
        dest = self.strategy.route(call, now, tally)
        if dest is None:
            tally.shed += 1
            call.state = GONE
            return
        centre = self.centres[dest]
        if not centre.phones_up:  # a dead line: the caller hears nothing and hangs up
            tally.abandoned += 1
            tally.dead_line += 1
            call.dest, call.state = dest, GONE
            self.strategy.ended(call, now)
            self._again(call, now)
        elif centre.take(call, now):
            self._answered(call, centre, now, tally)
        else:
            tally.waited += 1
            patience = caller.patience(call.attempt)
            if patience < math.inf:
                self._push(now + patience, _ABANDON, call)

    def _answered(self, call: Call, centre: Centre, now: float, tally: Tally) -> None:
        wait = now - call.t
        tally.answered += 1
        tally.answered_by[centre.id] = tally.answered_by.get(centre.id, 0) + 1
        tally.answered_at.append(call.t)
        tally.waits.append(wait)
        if wait <= WITHIN_S:
            tally.within += 1
            tally.within_bins[int(call.t) // BIN_S] += 1
        handling = call.caller.handling(call.attempt) * centre.handling_factor
        self._push(now + handling, _END, call)

    def _end(self, call: Call, now: float) -> None:
        centre = self.centres[call.dest]
        centre.finish(call, now)
        self.strategy.ended(call, now)
        self._serve(centre, now)

    def _serve(self, centre: Centre, now: float) -> None:
        while (call := centre.next_call()) is not None:
            caller = call.caller
            self._answered(call, centre, now, self.tallies[(caller.origin, caller.service)])

    def _abandon(self, call: Call, now: float) -> None:
        if call.state != WAITING:
            return  # answered (or cut off) before the caller gave up
        self.centres[call.dest].abandon(call, now)
        self.tallies[(call.caller.origin, call.caller.service)].abandoned += 1
        self.strategy.ended(call, now)
        self._again(call, now)

    def _again(self, call: Call, now: float) -> None:
        delay = call.caller.redial(call.attempt)  # the last attempt's is GIVES_UP
        if delay != GIVES_UP:
            self._push(now + delay, _ARRIVE, (call.caller, call.attempt + 1))

    # ---- the truth ----------------------------------------------------------------------

    def _truth(self, fid: str, now: float) -> None:
        truth = truth_at(self.scenario, fid, now)
        centre = self.centres[fid]
        centre.handlers = truth.handlers if truth.handlers is not None else handlers_at(
            self.scenario, fid, now, self.config.forces[fid].centre.handlers_on_duty)
        centre.handling_factor, centre.silent = truth.handling_factor, truth.silent
        if truth.external_aid != centre.external:
            delta = truth.external_aid - centre.external
            centre.hold_external(delta, now)
            self.strategy.external_aid(fid, delta, now)
        if truth.cad_up != centre.cad_up:
            centre.cad_up = truth.cad_up
            self.strategy.cad(fid, truth.cad_up, now)
        if truth.phones_up != centre.phones_up:
            centre.phones_up = truth.phones_up
            if not truth.phones_up:
                for call in centre.cut_off(now):
                    tally = self.tallies[(call.caller.origin, call.caller.service)]
                    tally.abandoned += 1
                    tally.dead_line += 1
                    self.strategy.ended(call, now)
                    self._again(call, now)
            self.strategy.phones(fid, truth.phones_up, now)
        self._serve(centre, now)

    def _sample(self, now: float) -> None:
        for fid, centre in self.centres.items():
            s = self.samples[fid]
            s.t.append(now)
            s.waiting_999.append(centre.waiting[0])
            s.waiting_101.append(centre.waiting[1])
            s.aid.append(centre.aid)
            s.belief.append(self.strategy.belief(fid, now))

    def _finish(self, events: int) -> Outcome:
        end = self.scenario.duration_s
        for centre in self.centres.values():
            centre.add_aid(0, end)  # close the time-over-cap account
            for lane in centre.lanes:
                for call in lane:
                    if call.state == WAITING:
                        self.tallies[(call.caller.origin, call.caller.service)].queued_at_end += 1
        return Outcome(self.strategy.name, self.tallies, self.centres, self.samples,
                       self.strategy.outages, next(self._ids) - 1, events)


def run(config: RouterConfig, scenario: Scenario, seed: int, strategy: str,
        callers: list[tuple[float, Caller]]) -> Outcome:
    return Run(config, scenario, seed, strategy).run(callers)

