"""The incident handoff as the contract defines it: the JSON a partner posts, the statuses a
handoff goes through, and the id that names it everywhere (API, store, destination CAD)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.config import FORCE_ID, Priority
from router.engine.model import Service

__all__ = ["RANK", "TERMINAL", "Caller", "HandoffConflict", "Incident", "Location", "Priority",
           "Status", "UnknownDestination", "differences", "handoff_id"]

RANK: Mapping[str, int] = {p: rank for rank, p in enumerate(get_args(Priority))}  # P1 first
ID_NAMESPACE = uuid.UUID("0d3c6f0e-6a43-5b8e-9a51-2f1f0c6f7e21")

Text = Annotated[str, Field(min_length=1, max_length=200)]

# What neither store can hold: PostgreSQL refuses NUL in text and jsonb, and an unpaired
# surrogate (JSON "\ud800") is not Unicode at all, so UTF-8 cannot encode it for either.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        """Refused here, where it enters, rather than by the database in a shared commit.
        (An unpaired surrogate pydantic refuses itself, as not a valid string.)"""
        if isinstance(value, str) and "\x00" in value:
            raise PydanticCustomError("unstorable_text",
                                      "must not contain a NUL character (U+0000)")
        return value


class Location(_Part):
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    address: Annotated[str, Field(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _somewhere(self) -> Location:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon go together")
        if self.lat is None and self.address is None:
            raise ValueError("a location needs lat and lon, or an address")
        return self


class Caller(_Part):
    name: Annotated[str, Field(max_length=200)] | None = None
    phone: Annotated[str, Field(max_length=32, pattern=r"^[0-9+() -]*$")] | None = None


class Incident(_Part):
    """The contract's incident handoff JSON (EIDO-inspired). `from` is a Python keyword,
    hence the alias."""

    incident_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
    from_: Annotated[str, Field(alias="from", pattern=FORCE_ID)]
    to: Annotated[str, Field(pattern=FORCE_ID)]
    priority: Priority
    service: Service
    call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    opened_at: AwareDatetime
    location: Location
    category: Text
    summary: Annotated[str, Field(min_length=1, max_length=4000)]
    caller: Caller | None = None

    @model_validator(mode="after")
    def _elsewhere(self) -> Incident:
        if self.from_ == self.to:
            raise ValueError("to: a force does not hand an incident to itself")
        return self

    def contract_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Status(StrEnum):
    """accepted → (held ⇄ delivering) → delivered (the CAD has it) → acknowledged (a
    dispatcher took it) or rejected → completed. `escalated` marks a missed deadline, for
    delivery or for a dispatcher's answer; `failed` is a CAD's permanent refusal; `on_paper`
    is a manager's word that the control room handles it on paper: nothing more is tried."""

    ACCEPTED = "accepted"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    HELD = "held"
    ESCALATED = "escalated"
    FAILED = "failed"
    ACKNOWLEDGED = "acknowledged"
    REJECTED = "rejected"
    OFFERED = "offered"  # rejected, and on its way to the next partner (`on_reject`)
    COMPLETED = "completed"
    ON_PAPER = "on_paper"  # handled on paper (a manager's word): no more delivery or escalation


# Final: the store refuses any later change, and a restarted desk does not resume them.
TERMINAL = frozenset({Status.FAILED, Status.REJECTED, Status.COMPLETED, Status.ON_PAPER})


def handoff_id(from_force: str, incident_id: str) -> str:
    """Deterministic, URL-safe: the same (from, incident_id) always names the same handoff,
    which is also the idempotency key the destination CAD sees."""
    return uuid.uuid5(ID_NAMESPACE, f"{from_force}\n{incident_id}").hex


class UnknownDestination(ValueError):
    pass


class HandoffConflict(ValueError):
    """The same (from, incident_id) was handed over before with other content; `fields` names
    each that differs, the first first."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def differences(incident: Incident, stored: Mapping[str, Any]) -> list[str]:
    """The contract fields (dotted, in the contract's order) where `incident` differs from one
    stored before. Both are compared as validated values, so key order, whitespace, number
    spelling, time zone notation and an explicit null for an absent field do not count. Keys
    outside the contract (anything the router may add to what it stores) are not compared."""
    names = _aliases(Incident)
    try:
        before = Incident.model_validate({k: v for k, v in stored.items() if k in names})
    except ValidationError:  # stored by an older, looser version: compare the JSON as stored
        now = incident.contract_json()
        return [name for name in names if now.get(name) != stored.get(name)]
    return _diff(incident, before)


def _aliases(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _diff(new: BaseModel, old: BaseModel, prefix: str = "") -> list[str]:
    out = []
    for name, field in type(new).model_fields.items():
        a, b = _absent_if_empty(getattr(new, name)), _absent_if_empty(getattr(old, name))
        label = prefix + (field.alias or name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            out += _diff(a, b, label + ".")
        elif a != b:
            out.append(label)
    return out


def _absent_if_empty(value: Any) -> Any:
    """`"caller": {}` says no more than leaving the caller out."""
    if isinstance(value, BaseModel) and not value.model_dump(exclude_none=True):
        return None
    return value
