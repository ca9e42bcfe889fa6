"""What every CAD adapter is, what it answers, and how the router finds one by name.

An adapter hands one incident to one force's CAD and reports the CAD's answer: an `Ack`
(the CAD has it; `duplicate` when it had it already), a `Refusal` (the CAD will never take
it: a permanent, 4xx-like answer), or it raises `AdapterUnavailable` for anything worth trying
again (CAD down, timeout, 5xx). Retries, deadlines and ordering are the desk's business, not
the adapter's: an adapter makes one attempt per call.

Adapters are found through the Python entry-point group `overflow_router.adapters`, so a
force can ship its own as a separate package. Each adapter class declares its options as a
pydantic model, validated when the router starts (and by `overflow-router validate`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import (
    Annotated,
    Any,
    ClassVar,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    runtime_checkable,
)

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

GROUP = "overflow_router.adapters"

# Used when the package's own entry points are not installed (running from a source tree);
# an installed entry point of the same name always wins.
BUILTIN: Mapping[str, str] = {
    "eido": "adapters.eido:EidoAdapter",
    "http_json": "adapters.http_json:HttpJsonAdapter",
    "mqtt": "adapters.mqtt:MqttAdapter",
    "spool": "adapters.spool:SpoolAdapter",
    "sim": "adapters.sim:SimAdapter",
    "ucri2": "adapters.ucri2:Ucri2Adapter",
}


class AdapterOptions(BaseModel):
    """Base for every adapter's options: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt's input. `key` is the idempotency key: the same for every retry of the same
    handoff, so a CAD that sees it twice can tell."""

    key: str
    incident: Mapping[str, Any]  # the contract's incident JSON, as accepted

    @property
    def incident_id(self) -> str:
        return str(self.incident["incident_id"])


@dataclass(frozen=True, slots=True)
class Ack:
    reference: str = ""  # the CAD's own incident number, when it gives one
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


Outcome = Ack | Refusal


# control characters and unpaired surrogates: nothing a person reading a reason needs
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def excerpt(answer: bytes | str, limit: int = 200) -> str:
    """A CAD's free text (a body, a status text) fit for a reason: decoded as UTF-8 whatever
    it holds, control characters replaced, at most `limit` characters."""
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
    return _UNPRINTABLE.sub("\ufffd", text[:limit])


class AdapterUnavailable(Exception):
    """The CAD could not be reached or did not answer in time: worth another attempt."""


class Deferred(AdapterUnavailable):
    """The CAD answered, but could not take this handoff now (a 5xx for it, a 429): worth
    another attempt later, for this handoff alone. The CAD itself is up, so the rest of its
    backlog goes on meanwhile."""


class AdapterConfigError(ValueError):
    """A force's `cad:` block names an unknown adapter or carries invalid options."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What people at the destination said of a handoff, after its CAD took it: a dispatcher
    accepted or rejected it (`acknowledgement`), later it was closed (`completion`). The
    UCRI2 `incident_transfer_police` shape; any adapter that hears it passes it on through
    `AdapterContext.answer`."""

    handoff_id: str
    kind: Literal["acknowledgement", "completion"]
    outcome: Literal["accepted", "rejected", "completed", "aborted"]
    at: float | None = None  # epoch seconds when the person answered; None: when received
    by: str = ""  # who: the dispatcher's name or identifier
    cause: str = ""  # why it was rejected (required then)
    note: str = ""
    reference: str = ""  # the destination CAD's own incident number


# which outcomes each kind of answer may have
OUTCOMES: Mapping[str, tuple[str, ...]] = {"acknowledgement": ("accepted", "rejected"),
                                           "completion": ("completed", "aborted")}


def cause_given(cause: str, outcome: object, name: str = "cause") -> str:
    """For inbound answers' validators: a rejection must say why."""
    if outcome == "rejected" and not cause.strip():
        raise ValueError(f"a rejection needs a {name}: the sender must know why")
    return cause


class AnswerRefused(Exception):
    """An answer the router will not record: `code` says why (`not_found`, `forbidden`,
    `not_delivered`, `conflict`, `invalid`), `str()` says it for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# Records an answer durably (and tells the sender) before returning; raises AnswerRefused.
AnswerSink = Callable[[Answer], Awaitable[None]]


async def _no_answers(answer: Answer) -> None:
    raise AnswerRefused("invalid", "this router takes no answers from adapters here")


@dataclass(frozen=True, slots=True)
class AdapterContext:
    force: str  # the destination force this adapter delivers to
    spool_dir: Path  # the router's spool folder (handoff.spool_dir)
    # where answers heard by the adapter go; the router checks they concern this force's
    # handoffs only (a destination answers for what was sent to it)
    answer: AnswerSink = _no_answers


@runtime_checkable
class Adapter(Protocol):
    async def deliver(self, delivery: Delivery) -> Outcome:
        """Make one delivery attempt; raise AdapterUnavailable when worth retrying."""

    async def aclose(self) -> None:
        """Release connections; the adapter is not used again."""


@runtime_checkable
class Updates(Protocol):
    """An adapter that also tells its force's CAD how the handoffs that force *sent* are
    going (delivered, acknowledged, rejected, completed, escalated): optional."""

    async def update(self, status: Mapping[str, Any]) -> None:
        """One transition, as `overflow/handoffs/{from}/status` carries it; raise
        AdapterUnavailable when worth retrying."""


@runtime_checkable
class Listens(Protocol):
    """An adapter that hears answers on a channel of its own (a listener, a subscription, a
    link it keeps open): optional. `start` opens that channel without waiting for a first
    delivery, so answers to handoffs sent before a restart still arrive. Idempotent, and it
    never raises for an unreachable peer: it keeps trying until `aclose`."""

    async def start(self) -> None: ...


# How an HTTP-like peer hears that its answer was not recorded (EIDO's statusCode too).
REFUSAL_STATUS: Mapping[str, int] = {"not_found": 404, "forbidden": 403, "not_delivered": 409,
                                     "conflict": 409, "invalid": 400}


def _storable(value: str) -> str:
    if "\x00" in value:  # neither store can hold NUL; refused where it enters
        raise ValueError("must not contain a NUL character (U+0000)")
    return value


# Free text a destination sends with an answer (cause, note, who, reference): bounded, storable.
AnswerText = Annotated[str, Field(max_length=1000), AfterValidator(_storable)]


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """The first thing wrong with an inbound message: (the field's dotted path, why)."""
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"]) or "(body)"
    message = "required" if error["type"] == "missing" else str(error["msg"])
    return field, message.removeprefix("Value error, ")


# An answer can overtake the record of its own delivery: the CAD acknowledges the delivery,
# and a fast dispatcher (or a simulated one) answers before the desk has stored `delivered`.
# `not_delivered` is therefore tried again for a moment before it counts as a refusal.
NOT_YET_DELIVERED_WAITS_S = (0.1, 0.2, 0.4, 0.8, 1.5)


async def pass_answer(sink: AnswerSink, answer: Answer) -> None:
    """Hand `answer` to the router, waiting out the race above; raises AnswerRefused."""
    for wait in (*NOT_YET_DELIVERED_WAITS_S, None):
        try:
            await sink(answer)
            return
        except AnswerRefused as exc:
            if exc.code != "not_delivered" or wait is None:
                raise
        await asyncio.sleep(wait)


class AdapterFactory(Protocol):
    """What an entry point must load: a class (or callable) with an `Options` model."""

    Options: ClassVar[type[AdapterOptions]]

    def __call__(self, options: Any, context: AdapterContext) -> Adapter: ...


class Link(Protocol):
    """A connection an adapter keeps open between deliveries."""

    @property
    def alive(self) -> bool: ...

    async def close(self) -> None: ...


L = TypeVar("L", bound=Link)


class Reconnecting(Generic[L]):
    """One live link at a time, opened on first use and replaced once it dies.

    The lock makes concurrent deliveries share one connection attempt instead of racing to
    open several.
    """

    def __init__(self, open_link: Callable[[], Awaitable[L]]):
        self._open = open_link
        self._link: L | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> L:
        async with self._lock:
            if self._link is not None and self._link.alive:
                return self._link
            await self.close()
            self._link = await self._open()
            return self._link

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def keep(self, what: str, check_s: float = 1.0, retry_s: float = 5.0) -> None:
        """Keep a link open until cancelled, for adapters whose peer talks first (answers
        arrive on the link). Logs the loss once and the recovery once, not every retry."""
        failing = False
        while True:
            try:
                await self.get()
            except AdapterUnavailable as exc:
                if not failing:
                    log.warning("%s unreachable, retrying every %ss: %s", what, retry_s, exc)
                failing = True
                await asyncio.sleep(retry_s)
                continue
            if failing:
                log.info("%s reachable again", what)
            failing = False
            await asyncio.sleep(check_s)


class Replies:
    """Deliveries awaiting the peer's acknowledgement, matched by key.

    A link's reader resolves them as answers arrive; when the link dies every one still
    waiting fails at once with AdapterUnavailable, so no delivery waits out its timeout.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Mapping[str, Any]]] = {}

    def expect(self, key: str) -> asyncio.Future[Mapping[str, Any]]:
        future: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    def forget(self, key: str) -> None:
        self._waiting.pop(key, None)

    def answer(self, key: str, reply: Mapping[str, Any]) -> None:
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def fail_all(self, error: AdapterUnavailable) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()


def available() -> dict[str, str]:
    """Every adapter name the router can use, with where it comes from."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def load(name: str) -> AdapterFactory:
    """The adapter class registered as `name`: an installed entry point, else a built-in."""
    try:
        for ep in entry_points(group=GROUP, name=name):
            factory = ep.load()
            break
        else:
            if name not in BUILTIN:
                raise AdapterConfigError(f"unknown adapter {name!r} (available: "
                                         f"{', '.join(sorted(available()))})")
            module, _, attr = BUILTIN[name].partition(":")
            factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:  # a broken plug-in is a config problem
        raise AdapterConfigError(f"cannot load adapter {name!r}: {exc}") from exc
    if not isinstance(getattr(factory, "Options", None), type) or not issubclass(
            factory.Options, BaseModel):
        raise AdapterConfigError(f"adapter {name!r} ({factory!r}) declares no pydantic Options")
    return factory  # type: ignore[no-any-return]


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown option"
    if error["type"] == "missing":
        return "required option is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def parse_options(name: str, options: Mapping[str, Any]) -> AdapterOptions:
    """Validate a `cad.options` mapping against the adapter's model; errors name the key."""
    factory = load(name)
    try:
        return factory.Options.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(options)'}: "
                             f"{_message(e)}" for e in exc.errors())
        raise AdapterConfigError(f"adapter {name!r}: {problems}") from None


def option_problems(name: str, options: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...],
                                                                          str]]:
    """Every problem with one force's `cad:` block, each with the key it concerns, relative to
    the block: `("adapter",)` or `("options", key, ...)`. For line-numbered config errors."""
    try:
        factory = load(name)
    except AdapterConfigError as exc:
        return [(("adapter",), str(exc))]
    try:
        factory.Options.model_validate(dict(options))
    except ValidationError as exc:
        return [(("options", *e["loc"]), f"{_message(e)} (adapter {name})")
                for e in exc.errors()]
    return []


def build(name: str, options: Mapping[str, Any], context: AdapterContext) -> Adapter:
    """Validate the options and construct the adapter (no I/O: adapters connect lazily)."""
    parsed = parse_options(name, options)
    return load(name)(parsed, context)


def check(cads: Mapping[str, tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Validate every force's adapter and options; one `forces.X.cad: message` per problem.

    `cads` maps force id to (adapter name, options), as in the config file.
    """
    problems = []
    for force, (name, options) in cads.items():
        try:
            parse_options(name, options)
        except AdapterConfigError as exc:
            problems.append(f"forces.{force}.cad: {exc}")
    return problems
