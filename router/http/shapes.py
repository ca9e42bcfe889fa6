"""The shapes of the service's JSON answers, as TypedDicts the OpenAPI document derives its
schemas from (router.http.openapi). Where a handler builds its answer as a plain dict, the
shape is written here once, reusing the enums and models it carries."""

from __future__ import annotations

from typing import Annotated, Literal, NotRequired

from pydantic import Field
from typing_extensions import TypedDict  # pydantic reads only this one before Python 3.12

from router.config import Priority
from router.engine.model import CentreState, Reason, Service
from router.engine.rules import Cause
from router.handoff.incident import Incident, Status
from router.watch.evidence import EvidenceMode
from router.watch.probes import Outcome
from router.watch.telemetry import Telemetry

# router.infra.timefmt.iso: every timestamp the router writes ends in Z
Timestamp = Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$",
                                 json_schema_extra={"format": "date-time"})]
Count = Annotated[int, Field(ge=0)]


class Error(TypedDict):
    """Every 4xx and 5xx: the contract's error, naming the field at fault when there is one."""

    error: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    message: Annotated[str, Field(min_length=1)]
    field: NotRequired[str]


class ConfigInvalid(Error):
    issues: Annotated[list[str], Field(min_length=1, description="FILE:LINE: key: message")]


# ---- a centre as router.watch.status.centre_status shows it --------------------------------

class Declaration(TypedDict):
    state: CentreState
    reason: str
    source: str
    declared_at: Timestamp
    expires_at: Timestamp | None


class TelemetrySeen(TypedDict):
    last: Telemetry
    age_s: Annotated[float, Field(ge=0)]
    stale: bool


class ProbeSeen(TypedDict):
    ok: bool
    outcome: Outcome
    latency_s: Annotated[float, Field(ge=0)]
    detail: str
    at: Timestamp


class CentreStatus(TypedDict):
    state: CentreState
    since: Timestamp
    reason: str
    source: str
    telephony_up: bool | None  # null while unknown
    cad_up: bool | None
    telemetry: TelemetrySeen | None
    override: Declaration | None
    held_until: Timestamp | None
    probes: dict[str, ProbeSeen]
    evidence: EvidenceMode


class Declared(CentreStatus):
    force: str
    remembered: Annotated[bool, Field(description=(
        "on disk and shared with the other routers; false: held in memory only, written "
        "once the operational state store answers again"))]


class Cleared(Declared):
    cleared: bool


# ---- GET /v1/forces and /v1/routing-table (router.http.forces) --------------------------------

class Diversion(TypedDict):
    cause: Cause | None
    share_diverted: Annotated[float, Field(ge=0, le=1)]
    reason: Reason
    rule: str


class Capacity(TypedDict):
    handlers_on_duty: Count
    overflow_queue: Count
    max_queue: Count


class ForceView(CentreStatus):
    name: str
    diverting: bool
    diversion: Diversion | None
    headline: str
    calls_in_flight: Count
    calls_in_flight_by_service: dict[Service, Count]
    aid_in_flight: Count
    capacity: Capacity
    headroom: dict[Literal["aid_999", "aid_101"], int]


class Forces(TypedDict):
    forces: dict[str, ForceView]
    fail_static: bool


class Share(TypedDict):
    destination: str
    share: Annotated[float, Field(ge=0, le=1)]
    reason: Reason
    rule: str


class RoutingTable(TypedDict):
    routing: dict[str, dict[Service, list[Share]]]


class IncomingShare(Share):
    origin: str
    service: Service
    origin_headline: str


class Incoming(TypedDict):
    """A partner's view: other forces' calls routed to it now, and the aid it gives."""

    force: str
    incoming: list[IncomingShare]
    aid_in_flight: Count
    headroom: dict[Literal["aid_999", "aid_101"], int]


# ---- dashboards: live updates and the audit timeline (router.http.events, timeline) ----------

class Ticket(TypedDict):
    ticket: Annotated[str, Field(min_length=16)]
    expires_in_s: Annotated[float, Field(gt=0)]
    role: Literal["viewer", "manager", "partner"]
    force: str | None
    operator: str | None


class AuditRecord(TypedDict, total=False):
    """One line of the audit log (router.infra.audit), as written; kinds add their own keys."""

    time: Timestamp
    kind: str
    force: str | None
    source: str
    reason: str
    seq: int
    prev: str
    hash: str


class AuditRecords(TypedDict):
    records: list[AuditRecord]
    count: Count


# ---- handoffs (router.handoff.desk.handoff_json) ----------------------------------------------

class HistoryEntry(TypedDict):
    at: Timestamp
    status: Status
    detail: NotRequired[str]
    # what people said (acknowledged, rejected, offered, completed)
    outcome: NotRequired[str]
    by: NotRequired[str]
    cause: NotRequired[str]
    note: NotRequired[str]
    reference: NotRequired[str]
    to: NotRequired[str]  # offered to this force next
    answered_at: NotRequired[Timestamp]


class PeopleSaid(TypedDict):
    """The current destination's answer: when recorded, and what was said."""

    at: Timestamp
    outcome: str
    by: NotRequired[str]
    cause: NotRequired[str]
    note: NotRequired[str]
    reference: NotRequired[str]
    to: NotRequired[str]
    answered_at: NotRequired[Timestamp]


Handoff = TypedDict("Handoff", {  # `from` is a keyword: the functional form
    "id": str, "incident_id": str, "from": str, "to": str, "priority": Priority,
    "status": Status, "attempts": Count, "accepted_at": Timestamp, "updated_at": Timestamp,
    "reason": NotRequired[str], "escalated_at": NotRequired[Timestamp],
    "delivered_at": NotRequired[Timestamp], "acknowledgement": NotRequired[PeopleSaid],
    "completion": NotRequired[PeopleSaid], "incident": Incident,
    "history": list[HistoryEntry]})


class HandoffList(TypedDict):
    handoffs: list[Handoff]
    count: Count


# ---- operations (router.http.ops) -------------------------------------------------------------

class Alive(TypedDict):
    status: Literal["ok"]
