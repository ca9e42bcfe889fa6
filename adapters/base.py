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
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

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


class AdapterConfigError(ValueError):
    """A force's `cad:` block names an unknown adapter or carries invalid options."""


@dataclass(frozen=True, slots=True)
class AdapterContext:
    force: str  # the destination force this adapter delivers to
    spool_dir: Path  # the router's spool folder (handoff.spool_dir)


@runtime_checkable
class Adapter(Protocol):
    async def deliver(self, delivery: Delivery) -> Outcome:
        """Make one delivery attempt; raise AdapterUnavailable when worth retrying."""

    async def aclose(self) -> None:
        """Release connections; the adapter is not used again."""


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
