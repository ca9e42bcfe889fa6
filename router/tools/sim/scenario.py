"""The scenario file: what the night is (arrivals, staffing, what fails when), validated once.

Times on the timeline are seconds after the scenario's `start` (a clock time, `HH:MM`); the
time-of-day arrival profile and handler shifts are clock times, so one profile serves any
night. What fails is the truth (`timeline`); what managers declare is an input to the router
(`declarations`); `manual` is how diversion was done by hand.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from router.config import ConfigError, ConfigIssue, RouterConfig, Strict, YamlTree, parse_document
from router.engine.model import CentreState, Service

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Clock = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
DAY_S = 86_400.0


class HandlingTime(Strict):
    """A duration drawn per call: how long an answered call occupies a handler (talk and
    wrap-up), or, as `Patience`, how long a caller waits before hanging up."""

    distribution: Literal["exponential", "lognormal", "fixed"] = "lognormal"
    mean_s: PosFloat
    sigma: PosFloat = 0.6  # lognormal shape: larger means a longer tail

    def draw(self, rng: random.Random) -> float:
        if self.distribution == "fixed":
            return self.mean_s
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean_s)
        # choose mu so that the lognormal's mean is mean_s
        return rng.lognormvariate(math.log(self.mean_s) - self.sigma ** 2 / 2, self.sigma)


class Patience(HandlingTime):
    distribution: Literal["exponential", "lognormal", "fixed"] = "exponential"  # Erlang A


class Repeat(Strict):
    """Callers who hang up unanswered (or hit a dead line) call again."""

    probability: Annotated[float, Field(ge=0, le=1)]
    mean_delay_s: PosFloat = 60.0  # exponential
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3  # the first call included


class ProfilePoint(Strict):
    at: Clock
    factor: NonNegFloat


class Shift(Strict):
    at: Clock
    handlers: Annotated[int, Field(ge=0)]


class Episode(Strict):
    """A stretch of time during which a centre is not its normal self (the truth)."""

    force: str
    from_s: NonNegFloat
    to_s: PosFloat | None = None  # None: until the end of the scenario
    telephony_up: bool | None = None
    cad_up: bool | None = None
    telemetry: Literal["report", "silent"] | None = None  # what the centre's ACD publishes
    arrivals_factor: NonNegFloat | None = None  # a surge (or a lull) of this force's calls
    handlers: Annotated[int, Field(ge=0)] | None = None  # staff on duty instead of the shift
    handling_factor: PosFloat | None = None  # e.g. longer calls while incidents go on paper
    external_aid: Annotated[int, Field(ge=1)] | None = None  # calls carried for a force
    # outside the scenario, routed through the router: they hold handlers and the aid cap

    @model_validator(mode="after")
    def _sense(self) -> Episode:
        if self.to_s is not None and self.to_s <= self.from_s:
            raise ValueError(f"to_s: {self.to_s} is not after from_s {self.from_s}")
        if all(getattr(self, k) is None for k in _CHANGES):
            raise ValueError(f"changes nothing: give {', '.join(_CHANGES)}")
        return self


_CHANGES = ("telephony_up", "cad_up", "telemetry", "arrivals_factor", "handlers",
            "handling_factor", "external_aid")


class Declaration(Strict):
    """A manager's declaration given to the router (`state`), or its end (`clear: true`)."""

    force: str
    at_s: NonNegFloat
    state: CentreState | None = None
    clear: bool = False
    for_s: PosFloat | None = None
    reason: str = "declared in the scenario"

    @model_validator(mode="after")
    def _one(self) -> Declaration:
        if (self.state is None) == (not self.clear):
            raise ValueError("give either state or clear: true")
        return self


class Manual(Strict):
    """Diversion by hand: once a centre's phones fail, after `delay_s` every call of that force
    goes to `partners` (default: its 999 routes and weights in the config) until its phones
    are back plus `return_delay_s`, or until `return_at_s` when given for that force."""

    delay_s: NonNegFloat = 600.0
    return_delay_s: NonNegFloat = 600.0
    return_at_s: dict[str, NonNegFloat] = Field(default_factory=dict)
    partners: dict[str, dict[str, Annotated[int, Field(ge=1)]]] = Field(default_factory=dict)


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    start: Clock = "00:00"  # the clock time of t = 0
    duration_s: PosFloat
    handling: dict[Service, HandlingTime]
    # a service without patience: its callers never hang up; without repeat: no one redials
    patience: dict[Service, Patience] = Field(default_factory=dict)
    repeat: dict[Service, Repeat] = Field(default_factory=dict)
    arrivals: dict[str, dict[Service, NonNegFloat]]  # calls per hour, per force and service
    profile: tuple[ProfilePoint, ...] = ()  # arrival factor by time of day (default 1)
    # handlers by time of day (default: the config's handlers_on_duty all night)
    shifts: dict[str, tuple[Shift, ...]] = Field(default_factory=dict)
    timeline: tuple[Episode, ...] = ()
    declarations: tuple[Declaration, ...] = ()
    manual: Manual = Manual()
    telemetry_interval_s: PosFloat = 5.0  # how often a centre's ACD publishes
    announcement_s: PosFloat = 20.0  # a shed 101 hears the announcement, then the call ends
    sample_s: Annotated[float, Field(ge=10)] = 60.0  # resolution of the charts

    @model_validator(mode="after")
    def _both_services(self) -> Scenario:
        missing = [s.value for s in Service if s not in self.handling]
        if missing:
            raise ValueError(f"handling: missing service {' and '.join(missing)}")
        return self

    def offset(self, clock: str) -> float:
        """Seconds from `start` to the next time the clock shows `clock` (0 for `start`)."""
        return (_seconds(clock) - _seconds(self.start)) % DAY_S

    def steps(self, points: Iterable[tuple[str, float]], default: float) -> list[
            tuple[float, float]]:
        """A daily step function of clock times as (t, value) changes over the scenario."""
        marks = sorted((self.offset(clock), value) for clock, value in points)
        if not marks:
            return [(0.0, default)]
        # before the day's first mark the day's last one holds (the night began the day before)
        out = [(0.0, marks[0][1] if marks[0][0] == 0 else marks[-1][1])]
        day = 0.0
        while day < self.duration_s:
            out += [(day + t, v) for t, v in marks if 0 < day + t < self.duration_s]
            day += DAY_S
        return out


def _seconds(clock: str) -> float:
    hours, minutes = clock.split(":")
    return int(hours) * 3600.0 + int(minutes) * 60.0


def clock_at(scenario: Scenario, t: float) -> str:
    """The clock time `t` seconds into the scenario, `HH:MM`."""
    s = int(_seconds(scenario.start) + t) % int(DAY_S)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}"


def load_scenario(path: str | Path, config: RouterConfig) -> Scenario:
    """Read and validate a scenario against the config it will run on; raises ConfigError
    with every problem as `FILE:LINE: key: message`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "(file)", exc.strerror or str(exc))]) from None
    return parse_document(text, str(path), Scenario, lambda tree, sc: check(tree, sc, config))


def check(tree: YamlTree, scenario: Scenario, config: RouterConfig) -> Iterable[ConfigIssue]:
    """What pydantic cannot see: every force named is in the config, every time in range."""
    known = ", ".join(sorted(config.forces))

    def unknown(where: tuple[str | int, ...], fid: str) -> Iterable[ConfigIssue]:
        if fid not in config.forces:
            yield tree.issue(where, f"unknown force {fid!r} (known: {known})")

    for key in ("arrivals", "shifts"):
        for fid in getattr(scenario, key):
            yield from unknown((key, fid), fid)
    for key in ("timeline", "declarations"):
        for i, item in enumerate(getattr(scenario, key)):
            yield from unknown((key, i, "force"), item.force)
            at = item.from_s if isinstance(item, Episode) else item.at_s
            if at >= scenario.duration_s:
                yield tree.issue((key, i, "from_s" if key == "timeline" else "at_s"),
                                 f"starts after the scenario ends ({scenario.duration_s:g} s)")
    for fid in scenario.manual.return_at_s:
        yield from unknown(("manual", "return_at_s", fid), fid)
    for fid, partners in scenario.manual.partners.items():
        yield from unknown(("manual", "partners", fid), fid)
        for partner in partners:
            yield from unknown(("manual", "partners", fid, partner), partner)
            if partner == fid:
                yield tree.issue(("manual", "partners", fid, partner), "diverts to itself")
