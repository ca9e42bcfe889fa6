"""The CAD adapters the desk delivers through: built from the config, leased by deliveries, and
closed only once no delivery uses them (a reload may replace one mid-delivery)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapters import base as adapters
from adapters.base import Adapter, AdapterContext, AnswerSink
from router.config import Cad, RouterConfig

log = logging.getLogger(__name__)

Spec = tuple[Cad, str]  # what a force's adapter is built from: its `cad:` block, the spool folder


def spec_of(config: RouterConfig, force: str) -> Spec:
    return config.forces[force].cad, config.handoff.spool_dir


def build_adapters(config: RouterConfig, forces: Iterable[str] | None = None,
                   answer_for: Callable[[str], AnswerSink] | None = None) -> dict[str, Adapter]:
    """One adapter per force (or per force named), its options validated now (raises
    AdapterConfigError naming every force at fault, one `forces.X.cad: ...` a line).
    `answer_for(force)`: where the adapter passes what the force's dispatchers answer."""
    spool = Path(config.handoff.spool_dir)
    built = {}
    problems = []
    for force in config.forces if forces is None else forces:
        spec = config.forces[force]
        try:
            context = (AdapterContext(force, spool, answer_for(force)) if answer_for
                       else AdapterContext(force, spool))
            built[force] = adapters.build(spec.cad.adapter, spec.cad.options, context)
        except adapters.AdapterConfigError as exc:
            problems.append(f"forces.{force}.cad: {exc}")
    if problems:
        raise adapters.AdapterConfigError("\n".join(problems))
    return built


@dataclass(slots=True, eq=False)
class CadLease:
    """An adapter and the deliveries using it: one a reload replaced is closed once they end."""

    adapter: Adapter
    spec: Spec | None  # None: built by someone who did not say from what
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while users == 0
    listening: bool = False  # its answer channel has been opened (adapters.base.Listens)

    def __post_init__(self) -> None:
        self.idle.set()

    async def listen(self) -> None:
        """Open the adapter's answer channel, if it has one, without waiting for a first
        delivery: answers to handoffs sent before a restart must still be heard."""
        if not self.listening:
            self.listening = True
            if isinstance(self.adapter, adapters.Listens):
                try:
                    await self.adapter.start()
                except Exception:  # a plug-in's fault must not take the desk down
                    log.exception("%r could not open its answer channel", self.adapter)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Adapter]:
        self.users += 1
        self.idle.clear()
        try:
            yield self.adapter
        finally:
            self.users -= 1
            if not self.users:
                self.idle.set()


class Cads:
    """Every adapter not yet closed, and those retired (replaced or their force removed) that
    must be closed once idle; whoever runs the desk starts that closing (`take_retired`)."""

    def __init__(self) -> None:
        self._unclosed: set[CadLease] = set()
        self._retired: list[CadLease] = []

    def add(self, cad: CadLease) -> CadLease:
        self._unclosed.add(cad)
        return cad

    def retire(self, cad: CadLease) -> None:
        self._retired.append(cad)

    def take_retired(self) -> list[CadLease]:
        retired, self._retired = self._retired, []
        return retired

    async def close_when_idle(self, cad: CadLease) -> None:
        await cad.idle.wait()
        await self._close(cad)

    async def aclose(self) -> None:
        """Close every adapter still open (once the deliveries have stopped)."""
        for cad in list(self._unclosed):
            await self._close(cad)

    async def _close(self, cad: CadLease) -> None:
        if cad in self._unclosed:
            self._unclosed.discard(cad)
            try:
                await cad.adapter.aclose()
            except Exception:
                log.exception("closing a CAD adapter failed")
