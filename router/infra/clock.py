"""Epoch time that never jumps: for stored timestamps whose differences are deadlines.

The handoff desk stores epoch seconds (they outlive the process and are shown to people) and
measures deadlines as differences between them. Read straight from `time.time`, an NTP step
of an hour forward would put every P1 past its 60 s deadline at once, and a step back would
hold escalations for an hour. `SteadyWall` starts at the wall clock, advances with the
monotonic clock, and follows a stepped wall clock only by slewing at most `max_slew` seconds
per second (as ntpd slews): a deadline of 60 s is never shorter or longer by more than
60 s x `max_slew`, while timestamps still converge to the true time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_SLEW = 0.01  # 10 ms a second: an hour's step is absorbed in 100 hours, deadlines ±1 %


class SteadyWall:
    """A callable clock: epoch seconds, monotonic, converging to the wall clock."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 max_slew: float = MAX_SLEW) -> None:
        self._wall, self._mono, self._max_slew = wall, monotonic, max_slew
        self._last_mono = monotonic()
        self._offset = wall() - self._last_mono  # epoch = monotonic + offset
        self._lock = threading.Lock()  # stores may read it from their worker threads

    def __call__(self) -> float:
        with self._lock:
            mono = self._mono()
            elapsed = max(mono - self._last_mono, 0.0)
            self._last_mono = mono
            error = (self._wall() - mono) - self._offset
            step = self._max_slew * elapsed
            self._offset += max(-step, min(step, error))
            return mono + self._offset


steady_wall = SteadyWall()  # one per process: every part reads the same time
