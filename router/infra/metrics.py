"""Every Prometheus metric, declared once. Units are in the names, as client_python advises."""

from __future__ import annotations

import functools
from typing import TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


def child(metric: M, *labels: str) -> M:
    """`metric.labels(*labels)`, looked up once per label set. labels() validates, locks and
    builds a key on every call: about a tenth of a route request's CPU before this cache.
    Label sets are bounded (forces, services, routes, statuses) and no child is ever removed."""
    return cast(M, _child(metric, labels))


@functools.cache
def _child(metric: MetricWrapperBase, labels: tuple[str, ...]) -> MetricWrapperBase:
    return metric.labels(*labels)


CENTRE_STATE = Gauge(
    "overflow_centre_state", "1 for the centre's current state, 0 for the others",
    ["force", "state"],
)
CENTRE_COMPONENT_UP = Gauge(
    "overflow_centre_component_up", "Telephony or CAD of a centre is up (1) or down (0)",
    ["force", "component"],
)
CALLS_ROUTED = Counter(
    "overflow_calls_routed_total", "Routing decisions made",
    ["service", "origin", "destination", "reason"],
)
DECISION_SECONDS = Histogram(
    "overflow_decision_seconds", "Time to make one routing decision (engine only)",
    buckets=(2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3),
)
CALLS_IN_FLIGHT = Gauge(
    "overflow_calls_in_flight", "Calls a centre carries that the router routed", ["force"]
)
CALLS_EXPIRED = Counter(
    "overflow_calls_expired_total", "Calls freed because no end was reported in time", ["force"]
)
PROBE_SECONDS = Histogram(
    "overflow_probe_seconds", "Probe round-trip time", ["force", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
PROBE_FAILURES = Counter(
    "overflow_probe_failures_total", "Probes that failed or timed out", ["force", "kind"]
)
TELEMETRY_MESSAGES = Counter(
    "overflow_telemetry_messages_total", "Telemetry messages by outcome", ["force", "outcome"]
)
FAILOVER_DETECTION_SECONDS = Histogram(
    "overflow_failover_detection_seconds",
    "From the first failed evidence to the centre being declared down",
    buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0),
)
STATE_CHANGES = Counter(
    "overflow_state_changes_total", "Centre state transitions", ["force", "to", "source"]
)
EVIDENCE_MODE = Gauge(
    "overflow_evidence_fail_static", "1 while the router keeps its last known-good plan because "
    "its evidence (broker and telemetry) failed", []
)
HANDOFF_BACKLOG = Gauge(
    "overflow_handoff_backlog", "Handoffs not yet delivered", ["destination", "priority"]
)
HANDOFF_DELIVERY_SECONDS = Histogram(
    "overflow_handoff_delivery_seconds", "From acceptance to the destination's acknowledgement",
    ["destination"], buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 5, 30, 60, 300),
)
HANDOFF_OUTCOMES = Counter(
    "overflow_handoff_outcomes_total", "Handoff status transitions", ["destination", "status"]
)
CONFIG_RELOADS = Counter("overflow_config_reloads_total", "Config reloads by outcome", ["outcome"])
HTTP_REQUESTS = Counter(
    "overflow_http_requests_total", "HTTP requests by route and status", ["route", "status"]
)
