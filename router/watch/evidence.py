"""How much the watcher can trust its evidence: live, fail static, or probes only.

Fail static: when the broker is gone and every telemetry feed has gone stale, the last
known-good telemetry stands for `health.fail_static_s` (probes still act: they need no broker),
then the watcher falls back to probes alone. Either way it says so, in the API and the
`overflow_evidence_fail_static` metric: stale never silently means healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from router.config import Health
from router.infra import metrics

log = logging.getLogger(__name__)


class EvidenceMode(StrEnum):
    LIVE = "live"  # telemetry (when configured) and probes
    FAIL_STATIC = "fail_static"  # broker gone, feeds stale: last known-good telemetry kept
    PROBES_ONLY = "probes_only"  # no broker configured, never reached, or fail static expired


class Evidence:
    """The evidence mode, from the broker's connection and the age of the telemetry feeds.
    Pure: the caller passes `now` and the feeds' ages."""

    def __init__(self, health: Health, *, has_broker: bool):
        self.health = health
        self.has_broker = has_broker
        self.broker_up = False
        self.lost_at: float | None = None  # when the broker went away (after a first connect)
        self._all_stale_since: float | None = None
        self.mode = EvidenceMode.PROBES_ONLY
        metrics.EVIDENCE_MODE.set(0)

    def connection(self, up: bool, now: float) -> None:
        self.broker_up = up
        if up:
            self.lost_at, self._all_stale_since = None, None
        else:
            self.lost_at = now

    def update(self, now: float, feed_ages: Iterable[float | None]) -> EvidenceMode:
        """Recompute the mode; `feed_ages` has one entry per centre that sends telemetry."""
        ages = list(feed_ages)
        max_age = self.health.telemetry_max_age_s
        if not self.has_broker or not ages:
            mode = EvidenceMode.PROBES_ONLY
        elif self.broker_up:
            mode = EvidenceMode.LIVE
        elif self.lost_at is None:
            mode = EvidenceMode.PROBES_ONLY  # the broker was never reached
        elif not all(a is None or a > max_age for a in ages):
            mode, self._all_stale_since = EvidenceMode.LIVE, None
        else:
            if self._all_stale_since is None:
                self._all_stale_since = now
            fresh = now < self._all_stale_since + self.health.fail_static_s
            mode = EvidenceMode.FAIL_STATIC if fresh else EvidenceMode.PROBES_ONLY
        if mode is not self.mode:
            level = logging.INFO if mode is EvidenceMode.LIVE else logging.WARNING
            log.log(level, "evidence: %s -> %s", self.mode.value, mode.value)
            self.mode = mode
            metrics.EVIDENCE_MODE.set(1 if mode is EvidenceMode.FAIL_STATIC else 0)
        return mode

    @property
    def freeze_telemetry_at(self) -> float | None:
        """While not probes-only, telemetry is judged as of the broker's loss (fail static)."""
        return self.lost_at if self.mode is not EvidenceMode.PROBES_ONLY else None

    def deadline(self) -> float | None:
        """When fail static ends, if it is in force."""
        if self.mode is EvidenceMode.FAIL_STATIC and self._all_stale_since is not None:
            return self._all_stale_since + self.health.fail_static_s
        return None

    def as_json(self, now: float) -> dict[str, Any]:
        until = self.deadline()
        return {"mode": self.mode.value, "broker_connected": self.broker_up,
                "fail_static_remaining_s": None if until is None else round(until - now, 3)}
