"""The `health:` block of `forces.yaml`: how centres are watched, in Envoy/HAProxy vocabulary.

Apart from schema.py, which imports it, so that neither grows too long to read.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PosFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    """As schema.Strict: unknown keys refused, frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class OutlierDetection(Strict):
    """Passive health from how calls end (Envoy's outlier detection): a centre whose phones
    answer probes but whose calls fail is ejected, i.e. taken down as a failed probe would.

    Ejected after `consecutive_failures` failed calls in a row, or when, over the last
    `interval_s`, at least `failure_percentage_request_volume` calls ended and at least
    `failure_percentage_threshold` % of them failed. Ejection lasts `base_ejection_time_s`
    times the number of ejections (up to `max_ejection_time_s`; the count is forgiven after a
    `max_ejection_time_s` without one); at most `max_ejection_percent` % of centres are
    ejected at once, and always at least one may be."""

    enabled: bool = True
    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    interval_s: PosFloat = 10.0
    failure_percentage_threshold: Annotated[int, Field(ge=1, le=100)] = 50
    failure_percentage_request_volume: Annotated[int, Field(ge=1)] = 20
    base_ejection_time_s: PosFloat = 30.0
    max_ejection_time_s: PosFloat = 300.0
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 20

    @model_validator(mode="after")
    def _times(self) -> OutlierDetection:
        if self.max_ejection_time_s < self.base_ejection_time_s:
            raise ValueError("max_ejection_time_s must be at least base_ejection_time_s")
        return self


class Health(Strict):
    """Defaults for every centre's watcher, in Envoy/HAProxy vocabulary.

    `unhealthy_edge_interval_s` and `healthy_edge_interval_s` (Envoy's names; HAProxy calls
    both `fastinter`): once a probe of a component that is up fails, or goes unanswered for
    longer than the edge interval, further probes of it are sent at this short interval until
    the component is confirmed down or answers again; likewise after a first success of one
    that is down. Edge probes time out after the edge interval or four times the slowest
    recent answer, whichever is longer (never after `timeout_s`), so a slow but live centre
    is not confirmed down by them."""

    interval_s: PosFloat = 0.25
    timeout_s: PosFloat = 0.2
    jitter: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 3
    unhealthy_edge_interval_s: PosFloat | None = 0.03  # None: no fast confirmation
    healthy_edge_interval_s: PosFloat | None = 0.03
    telemetry_max_age_s: PosFloat = 10.0
    fail_static_s: PosFloat = 60.0
    recovery: Recovery = Recovery()
    flap_damping: FlapDamping = FlapDamping()
    outlier_detection: OutlierDetection = OutlierDetection()
