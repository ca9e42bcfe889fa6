"""Centre telemetry: the contract's payload, validated where it enters, and its age.

A centre publishes `overflow/centres/{force}/telemetry` every few seconds. Only what passes
`parse_telemetry` reaches the state machines; the rest is counted by outcome, never raised
into the loop. Pure: no I/O; the wall clock is passed in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TOPIC_PATTERN = "centres/+/telemetry"  # relative to the MQTT prefix
MAX_PAYLOAD_BYTES = 16_384

Outcome = Literal["accepted", "invalid", "unknown_force", "ignored", "stale"]

NonNeg = Annotated[int, Field(ge=0)]


class Telemetry(BaseModel):
    """`{ts, telephony_up, cad_up, calls_waiting, handlers_available, handlers_on_duty,
    oldest_wait_s}`; `ts` is epoch seconds or ISO 8601 (naive means UTC). Extra fields are
    allowed: the contract lets fields be added."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ts: datetime
    telephony_up: bool
    cad_up: bool
    calls_waiting: NonNeg
    handlers_available: NonNeg
    handlers_on_duty: NonNeg
    oldest_wait_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("ts")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    def age_s(self, wall_now: float) -> float:
        """Seconds since the centre measured this; a clock ahead of ours counts as fresh."""
        return max(wall_now - self.ts.timestamp(), 0.0)


class TelemetryError(ValueError):
    """A payload that is not valid telemetry; `str()` says why in one line."""


def force_of(topic: str) -> str | None:
    """`centres/{force}/telemetry` (relative to the prefix) → force, else None."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "centres" and parts[2] == "telemetry" and parts[1]:
        return parts[1]
    return None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_telemetry(payload: bytes) -> Telemetry:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TelemetryError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise TelemetryError("not JSON we read: nested too deeply") from None
    except ValueError as exc:  # bad UTF-8 or JSON, NaN, an integer of thousands of digits
        raise TelemetryError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TelemetryError("not a JSON object")
    try:
        return Telemetry.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(payload)"
        raise TelemetryError(f"{where}: {first['msg']} ({exc.error_count()} error(s))") from None


def is_stale(telemetry: Telemetry, wall_now: float, max_age_s: float) -> bool:
    return telemetry.age_s(wall_now) > max_age_s


def as_dict(telemetry: Telemetry) -> dict[str, object]:
    """JSON-ready form for status pages (`ts` back to ISO 8601)."""
    out = telemetry.model_dump()
    out["ts"] = telemetry.ts.isoformat()
    return out
