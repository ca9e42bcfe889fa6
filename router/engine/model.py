"""Value types shared by the engine and the edges: services, centre states, snapshots, decisions.

Everything here is plain data with no I/O, so the policy engine can be fed from live health
watching, from the `route` what-if command or from a simulation alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, NotRequired

from typing_extensions import TypedDict  # pydantic reads only this one before Python 3.12


class Service(StrEnum):
    EMERGENCY = "999"
    NON_EMERGENCY = "101"


class CentreState(StrEnum):
    UNKNOWN = "unknown"  # no evidence yet
    NORMAL = "normal"
    OVERLOADED = "overloaded"  # up, over its overflow threshold
    DOWN = "down"  # cannot take calls
    DRAINING = "draining"  # declared by a manager: no new calls
    RECOVERING = "recovering"  # back after down: traffic returns in ramp steps


ShedAction = Literal["queue", "announcement"]  # where a shed 101 goes


class Reason(StrEnum):
    HOME = "home"
    ORIGIN_DOWN = "origin_down"
    ORIGIN_OVERLOADED = "origin_overloaded"
    ORIGIN_DRAINING = "origin_draining"
    ORIGIN_RECOVERING = "origin_recovering"
    ORIGIN_CAD_DOWN = "origin_cad_down"
    LAST_RESORT = "last_resort"
    SHED = "shed"


@dataclass(frozen=True, slots=True)
class CentreView:
    """What the engine knows of one centre at one instant.

    `since` is on the same clock as the `now` given to the engine (the service uses
    monotonic seconds); it only matters for `recovering`, whose ramp starts then.
    `calls_waiting` is None when telemetry is missing or stale: the engine then relies on its
    own count of calls in flight.
    """

    state: CentreState = CentreState.UNKNOWN
    telephony_up: bool = True
    cad_up: bool = True
    since: float = 0.0
    calls_waiting: int | None = None
    declared: bool = False  # the state is a manager's declaration, not inferred from evidence


UNKNOWN_CENTRE = CentreView()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of every centre. Replaced whole on each change, never mutated."""

    centres: Mapping[str, CentreView] = field(default_factory=dict)
    version: int = 0

    def get(self, force: str) -> CentreView:
        return self.centres.get(force, UNKNOWN_CENTRE)

    def with_centre(self, force: str, view: CentreView) -> Snapshot:
        return Snapshot({**self.centres, force: view}, self.version + 1)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one call goes and why. The edges add call_id, decision_id and decided_at."""

    service: Service
    origin: str
    destination: str
    sip_uri: str
    reason: Reason
    rule: str
    action: ShedAction | None = None  # for `shed` only

    @property
    def is_aid(self) -> bool:
        """True when a partner takes the call on the origin's behalf."""
        return self.destination != self.origin


class DecisionRecord(TypedDict):
    """Where a call goes and why, as the API answers it."""

    # The OpenAPI Decision schema is derived from this; the enums are StrEnums, so JSON
    # carries their values.

    call_id: str
    service: Service
    origin: str
    destination: str
    sip_uri: str
    reason: Reason
    rule: str
    decision_id: str
    decided_at: str
    action: NotRequired[ShedAction]  # for `shed` only


def decision_record(decision: Decision, call_id: str, decision_id: str,
                    decided_at: str) -> DecisionRecord:
    """The contract's routing-decision JSON object."""
    record = DecisionRecord(
        call_id=call_id,
        service=decision.service,
        origin=decision.origin,
        destination=decision.destination,
        sip_uri=decision.sip_uri,
        reason=decision.reason,
        rule=decision.rule,
        decision_id=decision_id,
        decided_at=decided_at,
    )
    if decision.action is not None:
        record["action"] = decision.action
    return record
