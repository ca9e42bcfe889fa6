"""Every Prometheus metric, declared once. Units are in the names, as client_python advises.

Most are kept up to date where things happen (a call routed, a probe answered). The board's
gauges (`BoardGauge`: capacity, headroom, queues, overrides, diversion, shares) are read from
the running router when Prometheus scrapes, through `BOARD`: they depend on every call in
flight, and recomputing them per call would tax the route path for a value read every 15 s.
"""

from __future__ import annotations

import functools
import logging
import platform
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router import __version__

log = logging.getLogger(__name__)

# `_created` series were a quarter of the exposition and nothing reads them
disable_created_metrics()  # type: ignore[no-untyped-call]

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
ROUTE_REQUEST_SECONDS = Histogram(
    "overflow_route_request_seconds",
    "A /v1/route request as a whole, handler start to response: auth, body, decision, JSON",
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5),
)
DECISION_SECONDS = Histogram(
    "overflow_decision_seconds", "Time to make one routing decision (engine only)",
    buckets=(2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3),
)
CALLS_IN_FLIGHT = Gauge(
    "overflow_calls_in_flight", "Calls a centre carries that this router routed", ["force"]
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
    "From the first failed evidence to the centre being declared down", ["force"],
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
CALL_OUTCOMES = Counter(
    "overflow_call_outcomes_total", "How calls ended at the centre they were sent to, as the "
    "SIP edge reported it", ["destination", "outcome"]
)
OUTLIER_EJECTIONS = Counter(
    "overflow_outlier_ejections_total", "Centres ejected because their calls failed while "
    "their probes may have passed", ["force"]
)
HANDOFF_OUTCOMES = Counter(
    "overflow_handoff_outcomes_total", "Handoff status transitions", ["destination", "status"]
)
HANDOFF_DEFERRALS = Counter(
    "overflow_handoff_deferrals_total", "Handoffs a CAD answered but could not take, put aside "
    "alone with a backoff", ["destination"]
)
HANDOFF_CLAIMS = Gauge(
    "overflow_handoff_claims_held", "Unfinished handoffs this router holds the claim of"
)
HANDOFF_TAKEN = Counter(
    "overflow_handoff_claims_taken_total", "Handoffs this router claimed that it had not "
    "accepted itself: at start, or from a router that stopped renewing its claims"
)
LEADER = Gauge(
    "overflow_leader", "1 on the router holding the leader's lease (it alone publishes the "
    "retained MQTT state and diversion alerts)"
)
PEER_INSTANCES = Gauge(
    "overflow_peer_instances", "Other routers whose calls in flight this one counts in: live "
    "(heard within 3 s) or silent (gone or cut off, their calls counted down)", ["state"]
)
PEER_AID_IN_FLIGHT = Gauge(
    "overflow_peer_aid_in_flight", "Calls a force answers for other forces that other routers "
    "routed, as they last said (a silent one's counted down), and this one's before a restart",
    ["force"]
)
TASK_RESTARTS = Counter(
    "overflow_task_restarts_total", "Long-lived parts of the service restarted after failing",
    ["task"]
)
MEMORY_WRITES = Counter(
    "overflow_state_store_writes_total", "Writes of operational state (declarations, last "
    "known centre states) by outcome", ["outcome"]
)
MEMORY_AVAILABLE = Gauge(
    "overflow_state_store_available", "1 while the operational state store answers; 0 while "
    "declarations are held in memory only"
)
HANDOFF_NOTICES = Counter(
    "overflow_handoff_notices_total", "Status updates passed to senders' CAD adapters",
    ["sender", "outcome"]
)
HANDOFF_ANSWER_SECONDS = Histogram(
    "overflow_handoff_answer_seconds",
    "From delivery to a dispatcher accepting or rejecting the handoff", ["destination"],
    buckets=(5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
CONFIG_RELOADS = Counter("overflow_config_reloads_total", "Config reloads by outcome", ["outcome"])
CONFIG_INFO = Gauge(
    "overflow_config_info", "1, labelled with the running config's hash and its forces",
    ["config_hash", "forces"],
)
CONFIG_LAST_RELOAD_SUCCESSFUL = Gauge(
    "overflow_config_last_reload_successful",
    "1 if the last load of the config (start or reload) applied it, 0 if it was refused",
)
CONFIG_LAST_RELOAD_SECONDS = Gauge(
    "overflow_config_last_reload_timestamp_seconds",
    "When the config was last loaded or a reload refused, in Unix seconds",
)
BUILD_INFO = Gauge(
    "overflow_build_info", "1, labelled with the router's version and Python's",
    ["version", "python"],
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)
HTTP_REQUESTS = Counter(
    "overflow_http_requests_total", "HTTP requests by route and status", ["route", "status"]
)


# ---- the board: read at scrape time ----------------------------------------------------------


@dataclass(frozen=True)
class BoardGauge:
    """A gauge whose samples come from the running router at each scrape."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]


Sample = tuple[tuple[str, ...], float]  # label values in `labelnames` order, value
Reading = Mapping[BoardGauge, Iterable[Sample]]

CENTRE_CAPACITY = BoardGauge(
    "overflow_centre_capacity", "A centre's configured limits: handlers on duty, the queue past "
    "which it overflows while overloaded, the queue past which it overflows at all",
    ("force", "limit"))
CALLS_IN_FLIGHT_BY_SERVICE = BoardGauge(
    "overflow_centre_calls_in_flight", "Calls a centre carries that the routers routed (this "
    "one's and, as they last said, the others'), by service", ("force", "service"))
CALLS_WAITING = BoardGauge(
    "overflow_centre_calls_waiting", "Calls waiting in a centre's queue, as the policy counts "
    "them (the larger of its own count and fresh telemetry)", ("force",))
OLDEST_WAIT_SECONDS = BoardGauge(
    "overflow_centre_oldest_wait_seconds", "The longest a caller has waited, from fresh "
    "telemetry; absent without it", ("force",))
HANDLERS_AVAILABLE = BoardGauge(
    "overflow_centre_handlers_available", "Call handlers free, from fresh telemetry; absent "
    "without it", ("force",))
TELEMETRY_AGE_SECONDS = BoardGauge(
    "overflow_centre_telemetry_age_seconds", "Age of a centre's last telemetry; absent if none "
    "arrived", ("force",))
AID_IN_FLIGHT = BoardGauge(
    "overflow_aid_in_flight", "Calls a force is answering for other forces now", ("force",))
AID_CAP = BoardGauge(
    "overflow_aid_cap", "Calls a force takes for others at once, per service (101 may not use "
    "the 999 reserve)", ("force", "service"))
AID_HEADROOM = BoardGauge(
    "overflow_aid_headroom", "Calls a force could still take for others, per service",
    ("force", "service"))
OVERRIDE_ACTIVE = BoardGauge(
    "overflow_override_active", "1 for the state a manager declared for a centre, 0 for the "
    "others; all 0 while none is declared", ("force", "state"))
OVERRIDE_AGE_SECONDS = BoardGauge(
    "overflow_override_age_seconds", "How long a manager's declaration has stood; absent "
    "while none does", ("force",))
DIVERTING = BoardGauge(
    "overflow_centre_diverting", "1 while some of a force's calls go to partners, as the "
    "routing rules decide", ("force",))
SHARE_DIVERTED = BoardGauge(
    "overflow_centre_share_diverted", "The share of a force's new calls that go to partners "
    "(1 all, 0 none, between: a recovery ramp step)", ("force",))
DIVERSION_CAUSE = BoardGauge(
    "overflow_centre_diversion_cause", "1 for why a force's calls go to partners, 0 for the "
    "other causes; all 0 while it keeps them", ("force", "cause"))
ROUTING_SHARE = BoardGauge(
    "overflow_routing_share", "Where an origin's next calls go now, per service: the plan's "
    "shares, as on /v1/routing-table", ("origin", "service", "destination", "reason"))

BOARD_GAUGES = (CENTRE_CAPACITY, CALLS_IN_FLIGHT_BY_SERVICE, CALLS_WAITING, OLDEST_WAIT_SECONDS,
                HANDLERS_AVAILABLE, TELEMETRY_AGE_SECONDS, AID_IN_FLIGHT, AID_CAP, AID_HEADROOM,
                OVERRIDE_ACTIVE, OVERRIDE_AGE_SECONDS, DIVERTING, SHARE_DIVERTED,
                DIVERSION_CAUSE, ROUTING_SHARE)


class Board(Collector):
    """The board's gauges, read through the one source bound to it (the latest router's
    exporter). Held weakly: a router that is gone stops reporting rather than lingering."""

    def __init__(self, gauges: tuple[BoardGauge, ...]):
        self.gauges = gauges
        self._source: weakref.WeakMethod[Callable[[], Reading]] | None = None

    def bind(self, read: Callable[[], Reading]) -> None:
        """`read` must be a bound method; its owner must outlive the scrapes it serves."""
        self._source = weakref.WeakMethod(read)

    def reading(self) -> Reading:
        read = self._source() if self._source is not None else None
        if read is None:
            return {}
        try:
            return read()
        except Exception:  # a bug here must not take every other metric down with it
            log.exception("reading the board's gauges failed; they are absent from this scrape")
            return {}

    def describe(self) -> Iterator[Metric]:
        for g in self.gauges:
            yield GaugeMetricFamily(g.name, g.documentation, labels=list(g.labelnames))

    def collect(self) -> Iterator[Metric]:
        reading = self.reading()
        for g in self.gauges:
            family = GaugeMetricFamily(g.name, g.documentation, labels=list(g.labelnames))
            for labels, value in reading.get(g, ()):
                family.add_metric(list(labels), value)
            yield family


BOARD = Board(BOARD_GAUGES)
REGISTRY.register(BOARD)
