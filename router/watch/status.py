"""A centre as the API and the dashboard show it: state, evidence, declaration, probes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.infra.timefmt import iso
from router.watch.evidence import EvidenceMode
from router.watch.health import CentreHealth, Component
from router.watch.prober import LastProbe
from router.watch.telemetry import as_dict


def centre_status(m: CentreHealth, probes: Mapping[str, LastProbe], mode: EvidenceMode,
                  now: float, wall: float) -> dict[str, Any]:
    """`now` is the machine's (monotonic) clock and `wall` the same instant in epoch seconds:
    every time shown is converted to wall time."""

    def at(moment: float) -> str:
        return iso(wall + (moment - now))

    age = m.telemetry_age(now)
    last = m.last_telemetry
    o = m.override
    return {
        "state": m.state.value,
        "since": at(m.since),
        "reason": m.reason,
        "source": m.source,
        "telephony_up": m.component(Component.TELEPHONY),
        "cad_up": m.component(Component.CAD),
        "telemetry": None if last is None else {
            "last": as_dict(last), "age_s": round(age or 0.0, 3),
            "stale": m.fresh_telemetry(now) is None},
        "override": None if o is None else {
            "state": o.state.value, "reason": o.reason, "source": o.source,
            "declared_at": at(o.declared_at),
            "expires_at": None if o.expires_at is None else at(o.expires_at)},
        "held_until": None if m.held_until is None else at(m.held_until),
        "probes": {pid: {"ok": p.result.ok, "outcome": p.result.outcome.value,
                         "latency_s": round(p.result.latency_s, 4),
                         "detail": p.result.detail, "at": iso(p.at)}
                   for pid, p in probes.items()},
        "evidence": mode.value,
    }
