"""The shape of `forces.yaml`: every setting, its type, its bounds and its default.

Pydantic models, frozen once validated: the rest of the router only ever sees a
`RouterConfig` that passed (router/config/load.py reads the file and reports errors).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.engine.model import Service

FORCE_ID = r"^[a-z][a-z0-9_]{1,31}$"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
Priority = Literal["P1", "P2", "P3", "P4"]  # of an incident handoff; P1 most urgent

NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
SIP_URI = r"^sips?:[^\s]+$"
ROLE = r"^(telephony|viewer|manager|partner:[a-z][a-z0-9_]*)$"
MQTT_PREFIX = r"^[^#+]*/$"

SipUri = Annotated[str, Field(pattern=SIP_URI)]

# how a pattern's failure is explained (config errors name the rule, not the regex)
PATTERN_MESSAGES = {
    SIP_URI: "must be a SIP URI such as sip:999@cc.force.example",
    FORCE_ID: "a force id is 2 to 32 lower-case letters, digits or _, starting with a letter",
    ROLE: "must be telephony, viewer, manager or partner:FORCE",
    MQTT_PREFIX: "must end with / and contain no + or #",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- centre capacity, overload and health ---------------------------------------------------


class OverloadLevels(Strict):
    """Telemetry levels; a centre is overloaded when any `enter` level is reached."""

    calls_waiting: NonNegInt | None = None
    oldest_wait_s: Annotated[float, Field(ge=0)] | None = None
    handlers_available_below: NonNegInt | None = None


class Overload(Strict):
    enter: OverloadLevels
    leave: OverloadLevels


class Probe(Strict):
    """An active check. `component` says which half of the centre it proves alive."""

    kind: Literal["http", "sip", "tcp"]
    target: str = Field(min_length=1)  # URL for http, host:port for sip and tcp
    component: Literal["telephony", "cad"]
    interval_s: PosFloat | None = None
    timeout_s: PosFloat | None = None

    @model_validator(mode="after")
    def _target_shape(self) -> Probe:
        if self.kind == "http" and not re.match(r"^https?://", self.target):
            raise ValueError(f"target: an http probe needs an http(s):// URL, got {self.target!r}")
        if self.kind != "http" and not re.match(r"^[^\s:]+:\d{1,5}$", self.target):
            raise ValueError(f"target: a {self.kind} probe needs host:port, got {self.target!r}")
        return self


class Shed101(Strict):
    """Where a 101 call goes when no one can take it: the home queue, or an announcement
    (used when the home centre itself is unreachable)."""

    queue: SipUri
    announcement: SipUri


class Centre(Strict):
    handlers_on_duty: NonNegInt
    overflow_queue: NonNegInt  # calls waiting beyond which, when overloaded, the excess overflows
    max_queue: NonNegInt  # calls waiting at home beyond which even a normal centre overflows
    answer_target_s: PosFloat = 10.0
    overload: Overload | None = None
    on_cad_down: Literal["keep", "overflow"] = "keep"
    probes: tuple[Probe, ...] = ()
    telemetry: bool = True
    shed_101: Shed101

    @model_validator(mode="after")
    def _queues(self) -> Centre:
        if self.overflow_queue > self.max_queue:
            raise ValueError(
                f"overflow_queue: {self.overflow_queue} is more than max_queue "
                f"({self.max_queue}): an overloaded centre would never overflow early"
            )
        return self


class MutualAid(Strict):
    """What a force gives to others: how many concurrent calls, while its queue is short."""

    max_concurrent: NonNegInt
    only_while_queue_below: NonNegInt
    services: tuple[Service, ...] = (Service.EMERGENCY, Service.NON_EMERGENCY)
    reserve_999: NonNegInt = 0

    @model_validator(mode="after")
    def _reserve(self) -> MutualAid:
        if self.reserve_999 > self.max_concurrent:
            raise ValueError(
                f"reserve_999: {self.reserve_999} is more than max_concurrent "
                f"({self.max_concurrent}): the 999 reserve is part of that cap"
            )
        return self


class Route(Strict):
    to: str
    weight: NonNegInt
    max_concurrent: NonNegInt | None = None  # cap on this origin's calls at this partner


class Cad(Strict):
    adapter: str = Field(min_length=1)
    options: dict[str, Any] = {}


class Force(Strict):
    name: str = Field(min_length=1)
    centre: Centre
    sip: dict[Service, SipUri]
    cad: Cad
    mutual_aid: MutualAid
    overflow: dict[Service, tuple[Route, ...]]
    notify_url: str | None = None  # partner notification hook (diversion started/changed/stopped)

    @field_validator("sip", "overflow")
    @classmethod
    def _both_services(cls, value: dict[Service, Any]) -> dict[Service, Any]:
        missing = [s.value for s in Service if s not in value]
        if missing:
            raise ValueError(f"missing service {' and '.join(missing)}: every force needs "
                             "both 999 and 101")
        return value


# ---- service-wide settings ------------------------------------------------------------------


class Token(Strict):
    env: str
    role: str = Field(pattern=ROLE)

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(f"not an environment variable name: {value!r}")
        return value


class Listen(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class ServiceSettings(Strict):
    listen: Listen = Listen()
    max_call_duration_s: PosFloat = 3600.0
    tokens: tuple[Token, ...] = ()
    audit_log: str = "var/audit.jsonl"  # declarations and state changes


class Mqtt(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    prefix: str = Field(default="overflow/", pattern=MQTT_PREFIX)
    username_env: str | None = None
    password_env: str | None = None


class Recovery(Strict):
    ramp: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (0.25, 0.5, 0.75, 1.0)
    step_s: PosFloat = 30.0

    @field_validator("ramp")
    @classmethod
    def _ramp(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or list(value) != sorted(value) or value[-1] != 1.0:
            raise ValueError("ramp must rise and end at 1.0")
        return value


class FlapDamping(Strict):
    window_s: PosFloat = 60.0
    max_transitions: Annotated[int, Field(ge=1)] = 2
    hold_s: PosFloat = 30.0
    max_hold_s: PosFloat = 600.0


class Health(Strict):
    """Defaults for every centre's watcher, in Envoy/HAProxy vocabulary."""

    interval_s: PosFloat = 0.25
    timeout_s: PosFloat = 0.2
    jitter: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 3
    telemetry_max_age_s: PosFloat = 10.0
    fail_static_s: PosFloat = 60.0
    recovery: Recovery = Recovery()
    flap_damping: FlapDamping = FlapDamping()


class HandoffRetry(Strict):
    """Delivery attempts to a CAD: exponential backoff with jitter between attempts, each
    attempt bounded; after `attempts` failures the destination's backlog is held and one
    handoff is tried every `hold_probe_s` until one gets through (or the CAD is seen back)."""

    attempts: Annotated[int, Field(ge=1)] = 4
    initial_s: PosFloat = 0.2
    max_s: PosFloat = 5.0
    attempt_timeout_s: PosFloat = 5.0
    hold_probe_s: PosFloat = 5.0


class Handoff(Strict):
    store: str = "sqlite:///var/handoffs.db"
    spool_dir: str = "var/spool"
    deadlines_s: dict[Priority, PosFloat] = {
        "P1": 60.0,
        "P2": 300.0,
        "P3": 1800.0,
        "P4": 7200.0,
    }
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    retry: HandoffRetry = HandoffRetry()


class RouterConfig(Strict):
    version: Literal[1]
    service: ServiceSettings = ServiceSettings()
    mqtt: Mqtt = Mqtt()
    health: Health = Health()
    handoff: Handoff = Handoff()
    forces: dict[Annotated[str, Field(pattern=FORCE_ID)], Force] = Field(min_length=1)
