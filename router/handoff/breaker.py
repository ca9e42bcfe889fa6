"""The circuit breaker in front of one destination's CAD: "hold and probe".

- closed: deliveries flow, with up to `handoff.max_concurrency` in flight, as long as the
  health watcher does not report the CAD down (`cad_up`).
- open: a delivery ran out of retries (or its status could not be stored). The backlog is held
  and nothing is sent until `hold_s` has passed, so a struggling CAD is not hammered.
- half-open: `hold_s` has passed and the watcher does not report the CAD down: ONE handoff
  gets ONE attempt. Success closes the breaker and the backlog drains; failure opens it for
  another `hold_s`. A probe that never reports back counts as a failure once `hold_s` passes.

The watcher reporting the CAD back up closes the breaker at once: its word is better evidence
than the age of our last failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]


class CadBreaker:
    def __init__(self, hold_s: float, *, clock: Callable[[], float],
                 cad_up: Callable[[], bool] = lambda: True) -> None:
        self.hold_s = hold_s  # a reload may change it; it applies from the next trip
        self.clock = clock
        self.cad_up = cad_up
        self._until: float | None = None  # None: closed; else no new probe before then
        self._probing = False

    @property
    def state(self) -> State:
        if self._until is None:
            return "closed"
        return "half-open" if self._probing and self.clock() < self._until else "open"

    def allows(self) -> bool:
        """May deliveries flow freely?"""
        return self._until is None and self.cad_up()

    def probe(self) -> bool:
        """If a probe is due, go half-open and return True: the caller makes one attempt and
        reports it with `close` or `trip`."""
        if self._until is None or self.clock() < self._until or not self.cad_up():
            return False
        self._until = self.clock() + self.hold_s
        self._probing = True
        return True

    def trip(self) -> bool:
        """Open (again) for `hold_s`; True if it was closed until now."""
        was_closed = self._until is None
        self._until = self.clock() + self.hold_s
        self._probing = False
        return was_closed

    def close(self) -> bool:
        """The CAD answered; True if the breaker was not closed until now."""
        was_open = self._until is not None
        self._until = None
        self._probing = False
        return was_open

    def cad_state_changed(self, up: bool) -> None:
        """The health watcher's word: up closes at once; down is seen through `cad_up`."""
        if up:
            self.close()

    def wait_s(self, cap: float) -> float:
        """How long until a probe may be due, at most `cap` (the watcher may change its mind)."""
        if self._until is None:
            return cap
        return max(min(self._until - self.clock(), cap), 0.0)
