"""The centres as they really are: handlers on duty and two FIFO lanes, 999 ahead of 101.

A call that finds a handler free is answered at once; otherwise it waits in its lane until a
handler frees (999 first, then 101, each first come first served: non-preemptive priority) or
the caller's patience runs out. A call routed to another force queues at that partner with the
partner's own callers. Calls waiting when a centre's phones fail are cut off; calls already
being answered finish. Nothing here knows about routing: the run (router/tools/sim/run.py)
brings calls and takes them away.
"""

from __future__ import annotations

from collections import deque

from router.tools.sim.callers import Caller

WAITING, TALKING, GONE = 0, 1, 2


class Call:
    """One attempt by one caller."""

    __slots__ = ("aid", "attempt", "caller", "dest", "id", "state", "t")

    def __init__(self, call_id: str, caller: Caller, attempt: int, t: float):
        self.id = call_id
        self.caller = caller
        self.attempt = attempt
        self.t = t  # when it was routed; its answer time runs from here
        self.dest = ""
        self.state = WAITING
        self.aid = False  # carried by a centre for another force


class Centre:
    """One control room's truth. Also counts the calls it carries for others (aid) against
    its mutual-aid cap, and for how long it carried more than that."""

    __slots__ = ("_aid_at", "aid", "aid_cap", "aid_peak", "busy", "cad_up", "external",
                 "handlers", "handling_factor", "id", "lanes", "over_cap_s", "phones_up",
                 "silent", "waiting")

    def __init__(self, force: str, handlers: int, aid_cap: int):
        self.id = force
        self.handlers = handlers
        self.busy = 0
        self.lanes: tuple[deque[Call], deque[Call]] = (deque(), deque())
        self.waiting = [0, 0]  # per lane, not counting callers who hung up
        self.phones_up = True
        self.cad_up = True
        self.silent = False
        self.handling_factor = 1.0
        self.external = 0
        self.aid = 0
        self.aid_cap = aid_cap
        self.aid_peak = 0
        self.over_cap_s = 0.0
        self._aid_at = 0.0

    # ---- calls ------------------------------------------------------------------------

    def take(self, call: Call, now: float) -> bool:
        """A call arrives: True when a handler answers it at once, else it waits."""
        call.dest = self.id
        if call.caller.origin != self.id:
            call.aid = True
            self.add_aid(1, now)
        if self.busy < self.handlers:
            self.busy += 1
            call.state = TALKING
            return True
        call.state = WAITING
        lane = call.caller.lane
        self.lanes[lane].append(call)
        self.waiting[lane] += 1
        return False

    def next_call(self) -> Call | None:
        """A handler is free: the longest-waiting 999, else the longest-waiting 101."""
        if self.busy >= self.handlers:
            return None
        for lane, queue in enumerate(self.lanes):
            while queue:
                call = queue.popleft()
                if call.state == WAITING:
                    self.waiting[lane] -= 1
                    self.busy += 1
                    call.state = TALKING
                    return call
        return None

    def finish(self, call: Call, now: float) -> None:
        self.busy -= 1
        self._leave(call, now)

    def abandon(self, call: Call, now: float) -> None:
        """The caller hung up while waiting (left in its lane, skipped when reached)."""
        self.waiting[call.caller.lane] -= 1
        self._leave(call, now)

    def cut_off(self, now: float) -> list[Call]:
        """The phones failed: every caller still waiting is cut off."""
        gone = [c for lane in self.lanes for c in lane if c.state == WAITING]
        for lane in self.lanes:
            lane.clear()
        self.waiting = [0, 0]
        for call in gone:
            self._leave(call, now)
        return gone

    def _leave(self, call: Call, now: float) -> None:
        call.state = GONE
        if call.aid:
            self.add_aid(-1, now)

    # ---- what the centre's ACD would report ---------------------------------------------

    @property
    def calls_waiting(self) -> int:
        return self.waiting[0] + self.waiting[1]

    @property
    def handlers_available(self) -> int:
        return max(self.handlers - self.busy, 0)

    def oldest_wait(self, now: float) -> float:
        oldest = now
        for queue in self.lanes:
            while queue and queue[0].state != WAITING:
                queue.popleft()  # hung up: no longer in the queue
            if queue:
                oldest = min(oldest, queue[0].t)
        return now - oldest

    # ---- mutual aid ---------------------------------------------------------------------

    def add_aid(self, delta: int, now: float) -> None:
        if self.aid > self.aid_cap:
            self.over_cap_s += now - self._aid_at
        self._aid_at = now
        self.aid += delta
        self.aid_peak = max(self.aid_peak, self.aid)

    def hold_external(self, delta: int, now: float) -> None:
        """Calls carried for a force outside the scenario start (+) or end (-)."""
        self.external += delta
        self.busy += delta
        self.add_aid(delta, now)
