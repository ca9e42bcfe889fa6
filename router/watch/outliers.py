"""Grey failures from call outcomes: Envoy's outlier detection, per centre, pure.

A centre can answer SIP OPTIONS while its calls fail (486, 503, no answer): probes alone would
keep sending it 999 calls. Kamailio reports how each call ended at the centre the router chose
(`POST /v1/calls/{id}/end` with an outcome); the watcher feeds those outcomes here, and an
`Ejection` takes the centre's telephony down in its health machine (router/watch/health.py) as
a failed probe would, so the engine only ever sees the resulting state.

No I/O and no clock: every input carries `now` (monotonic seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from router.config.health import OutlierDetection


class Outcome(StrEnum):
    """How a call ended at the centre it was sent to."""

    ANSWERED = "answered"
    FAILED = "failed"  # a final SIP error from the centre (486, 503, ...)
    NO_ANSWER = "no_answer"  # nothing within the relay timeout (408, 480)
    CANCELLED = "cancelled"  # the caller gave up first: says nothing about the centre


def outcome_of(outcome: str | None, sip_code: int | None) -> Outcome | None:
    """The outcome as reported, or as the SIP final code implies; None if neither says."""
    if outcome is not None:
        return Outcome(outcome)
    if sip_code is None:
        return None
    if 200 <= sip_code < 300:
        return Outcome.ANSWERED
    if sip_code in (408, 480):
        return Outcome.NO_ANSWER
    if sip_code == 487:  # Request Terminated: the caller's CANCEL
        return Outcome.CANCELLED
    return Outcome.FAILED if sip_code >= 300 else None


@dataclass(frozen=True, slots=True)
class Ejection:
    force: str
    until: float
    reason: str
    number: int  # how many times in a row of ejections: the time grows with it


@dataclass(slots=True)
class _Centre:
    consecutive: int = 0
    window: deque[tuple[float, bool]] = field(default_factory=deque)  # (when, failed)
    until: float | None = None  # ejected until
    ejections: int = 0
    last_until: float | None = None  # when the last ejection ended


class Outliers:
    """Counts each centre's call outcomes and decides ejections."""

    def __init__(self, settings: OutlierDetection) -> None:
        self.settings = settings
        self._centres: dict[str, _Centre] = {}
        self.capped = 0  # ejections refused by max_ejection_percent, for the metrics

    def reconfigure(self, settings: OutlierDetection) -> None:
        self.settings = settings

    def ejected(self, now: float) -> list[str]:
        return [f for f, c in self._centres.items() if c.until is not None and now < c.until]

    def record(self, force: str, outcome: Outcome, now: float, centres: int) -> Ejection | None:
        """One call's end at `force`, out of `centres` watched; the ejection it causes, if any."""
        s = self.settings
        c = self._centres.setdefault(force, _Centre())
        if not s.enabled or outcome is Outcome.CANCELLED:
            return None
        if c.until is not None:
            if now < c.until:
                return None  # ejected: calls ending now were placed before; they add nothing
            c.last_until, c.until, c.consecutive = c.until, None, 0  # judged afresh (Envoy)
            c.window.clear()
        failed = outcome is not Outcome.ANSWERED
        c.consecutive = c.consecutive + 1 if failed else 0
        c.window.append((now, failed))
        while c.window and c.window[0][0] <= now - s.interval_s:
            c.window.popleft()
        reason = self._reason(c, outcome)
        if reason is None:
            return None
        cap = max(1, s.max_ejection_percent * centres // 100)
        if len(self.ejected(now)) >= cap:
            self.capped += 1
            return None
        if c.last_until is not None and now - c.last_until > s.max_ejection_time_s:
            c.ejections = 0  # a long quiet spell forgives earlier ejections
        c.ejections += 1
        ejection_s = min(s.base_ejection_time_s * c.ejections, s.max_ejection_time_s)
        c.until = now + ejection_s
        return Ejection(force, c.until, f"{reason}; ejected for {ejection_s:g}s", c.ejections)

    def _reason(self, c: _Centre, outcome: Outcome) -> str | None:
        s = self.settings
        if c.consecutive >= s.consecutive_failures:
            return f"{c.consecutive} calls in a row failed at the centre " \
                   f"(last: {outcome.value})"
        failures = sum(1 for _, f in c.window if f)
        if len(c.window) >= s.failure_percentage_request_volume \
                and failures * 100 >= s.failure_percentage_threshold * len(c.window):
            return f"{failures} of {len(c.window)} calls failed at the centre " \
                   f"within {s.interval_s:g}s"
        return None
