"""Load and validate `forces.yaml`.

Validation happens once, here, where the file enters: every error is reported as
`FILE:LINE: key.path: message`, all of them at once, so a manager fixes a config in one pass.
The rest of the router only ever sees a `RouterConfig` that passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.model import Service

FORCE_ID = r"^[a-z][a-z0-9_]{1,31}$"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
PRIORITIES = ("P1", "P2", "P3", "P4")

NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
SIP_URI = r"^sips?:[^\s]+$"
ROLE = r"^(telephony|viewer|manager|partner:[a-z][a-z0-9_]*)$"
MQTT_PREFIX = r"^[^#+]*/$"

SipUri = Annotated[str, Field(pattern=SIP_URI)]


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
    deadlines_s: dict[Literal["P1", "P2", "P3", "P4"], PosFloat] = {
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


# ---- loading with line numbers --------------------------------------------------------------

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found; str() gives one `FILE:LINE: key: message` per line."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _key_text(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


class _Tree:
    """A YAML document turned into plain data, remembering the line of every key."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.issues: list[ConfigIssue] = []
        self._scalars = yaml.SafeLoader("")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 if mark else 1
            problem = getattr(exc, "problem", None) or str(exc)
            context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and start and start.line + 1 != line:  # say where the broken part began
                problem += f" ({context} that starts on line {start.line + 1})"
            self.issues.append(ConfigIssue(file, line, "(yaml)", f"not valid YAML: {problem}"))
            self.data: Any = None
            return
        self.data = self._convert(node, ()) if node is not None else None

    def _convert(self, node: yaml.Node, path: Path_) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalars.construct_object(key_node)
                key = str(key) if isinstance(key, (int, float, bool)) else key
                sub = (*path, key)
                if key in out:
                    self.issues.append(
                        ConfigIssue(self.file, key_node.start_mark.line + 1, _key_text(sub),
                                    f"duplicate key, already set on line {self.lines[sub]} "
                                    "(YAML would silently keep only the last)")
                    )
                self.lines[sub] = key_node.start_mark.line + 1
                out[key] = self._convert(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node)

    def line_of(self, path: Path_) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.line_of(path), _key_text(path), message)


def _pydantic_issues(tree: _Tree, exc: ValidationError) -> Iterable[ConfigIssue]:
    for err in exc.errors():
        # pydantic puts union/annotated branch names and dict-key markers into loc; drop them
        path: Path_ = tuple(p for p in err["loc"] if p not in ("[key]",) and not _is_branch(p))
        kind = err["type"]
        msg = _plain_message(kind, err.get("ctx", {})) or err["msg"]
        if kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
            field_, sep, rest = msg.partition(": ")
            if sep and " " not in field_:
                path, msg = (*path, field_), rest
        if kind not in ("missing", "extra_forbidden") and "input" in err and not isinstance(
            err["input"], (dict, list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        yield tree.issue(path, msg)


# pydantic's wording ("Input should be ...") addressed to the people who edit this file
_PLAIN = {
    "extra_forbidden": "unknown key (misspelt, or not allowed here)",
    "missing": "required key is missing",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "greater_than_equal": "must be {ge:g} or more",
    "greater_than": "must be more than {gt:g}",
    "less_than_equal": "must be {le:g} or less",
    "less_than": "must be less than {lt:g}",
    "literal_error": "must be {expected}",
    "enum": "must be {expected}",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
}
_PATTERNS = {
    SIP_URI: "must be a SIP URI such as sip:999@cc.force.example",
    FORCE_ID: "a force id is 2 to 32 lower-case letters, digits or _, starting with a letter",
    ROLE: "must be telephony, viewer, manager or partner:FORCE",
    MQTT_PREFIX: "must end with / and contain no + or #",
}


def _plain_message(kind: str, ctx: dict[str, Any]) -> str | None:
    if kind == "string_pattern_mismatch":
        return _PATTERNS.get(ctx.get("pattern", ""))
    template = _PLAIN.get(kind)
    return template.format(**ctx) if template else None


def _is_branch(part: str | int) -> bool:
    return isinstance(part, str) and (part.startswith(("function-", "constrained-")) or part in (
        "int", "float", "str", "bool", "none", "list[str]", "tuple[str, ...]"
    ))


def _semantic_issues(tree: _Tree, cfg: RouterConfig) -> Iterable[ConfigIssue]:
    """Cross-references pydantic cannot see: routes must name real partners that help."""
    known = ", ".join(sorted(cfg.forces))
    for origin, force in cfg.forces.items():
        for service, routes in force.overflow.items():
            base: Path_ = ("forces", origin, "overflow", service.value)
            seen: set[str] = set()
            for i, route in enumerate(routes):
                where = (*base, i, "to")
                partner = cfg.forces.get(route.to)
                if route.to == origin:
                    yield tree.issue(where, f"routes to itself ({origin})")
                elif partner is None:
                    yield tree.issue(where, f"unknown force {route.to!r} (known: {known})")
                elif route.to in seen:
                    yield tree.issue(where, f"{route.to} is listed twice")
                elif service not in partner.mutual_aid.services:
                    yield tree.issue(
                        where, f"{route.to} gives no mutual aid for {service.value} "
                        f"(forces.{route.to}.mutual_aid.services)"
                    )
                elif partner.sip[service] == force.sip[service]:
                    yield tree.issue(
                        where, f"{route.to}'s {service.value} destination {partner.sip[service]} "
                        f"is {origin}'s own: the call would bounce back (cycle)"
                    )
                seen.add(route.to)
            if routes and sum(r.weight for r in routes) == 0:
                yield tree.issue(base, "weights sum to zero: no partner could ever be chosen")
    from adapters.base import option_problems  # each adapter owns its options' model

    for fid, force in cfg.forces.items():
        for where, message in option_problems(force.cad.adapter, force.cad.options):
            yield tree.issue(("forces", fid, "cad", *where), message)
    for i, token in enumerate(cfg.service.tokens):
        role = token.role
        if role.startswith("partner:") and role.removeprefix("partner:") not in cfg.forces:
            yield tree.issue(("service", "tokens", i, "role"),
                             f"{role!r} names an unknown force (known: {known})")


YamlTree = _Tree  # for cross-checks of other YAML documents (see parse_document)
M = TypeVar("M", bound=BaseModel)


def parse_document(text: str, file: str, model: type[M],
                   cross_check: Callable[[YamlTree, M], Iterable[ConfigIssue]]) -> M:
    """Validate any YAML document (the config, a simulation scenario) the same way: every
    problem at once, each as `FILE:LINE: key: message`."""
    tree = _Tree(file, text)
    if tree.issues and tree.data is None:
        raise ConfigError(tree.issues)
    if not isinstance(tree.data, dict):
        raise ConfigError([*tree.issues, tree.issue((), "the file must be a YAML mapping")])
    try:
        doc = model.model_validate(tree.data)
    except ValidationError as exc:
        issues = [*tree.issues, *_pydantic_issues(tree, exc)]
        raise ConfigError(sorted(issues, key=lambda i: i.line)) from None
    issues = [*tree.issues, *cross_check(tree, doc)]
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: i.line))
    return doc


def parse_config(text: str, file: str = "<config>") -> RouterConfig:
    return parse_document(text, file, RouterConfig, _semantic_issues)


def load_config(path: str | Path) -> RouterConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "(file)", exc.strerror or str(exc))]) from None
    return parse_config(text, str(path))
