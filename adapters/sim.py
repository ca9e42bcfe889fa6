"""An in-process simulated CAD, for the demo and for tests of the desk itself.

It acknowledges after a configurable latency, refuses categories it is told to, and can be
switched down and up (`sim_cad(force).up = False`) to show a held backlog draining. It keeps
what it received keyed by idempotency key, as a real CAD would, so a redelivery is reported
as a duplicate rather than counted twice.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from adapters.base import (
    Ack,
    AdapterContext,
    AdapterOptions,
    AdapterUnavailable,
    Delivery,
    Outcome,
    Refusal,
)


class SimOptions(AdapterOptions):
    latency_s: float = Field(default=0.002, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    up: bool = True
    refuse_categories: tuple[str, ...] = ()


@dataclass
class SimCad:
    force: str
    up: bool = True
    received: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> incident
    attempts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0  # the most deliveries it ever had at once


_CADS: dict[str, SimCad] = {}


def sim_cad(force: str) -> SimCad:
    """The simulated CAD of a force (created on first use), shared by its adapter and by
    whoever flips its switch."""
    return _CADS.setdefault(force, SimCad(force))


class SimAdapter:
    Options = SimOptions

    def __init__(self, options: SimOptions, context: AdapterContext):
        self.options = options
        self.cad = sim_cad(context.force)
        self.cad.up = options.up
        self._rng = random.Random()

    async def deliver(self, delivery: Delivery) -> Outcome:
        opts = self.options
        cad = self.cad
        cad.attempts += 1
        cad.in_flight += 1
        cad.max_in_flight = max(cad.max_in_flight, cad.in_flight)
        try:
            delay = opts.latency_s + (self._rng.uniform(0, opts.jitter_s) if opts.jitter_s else 0)
            if delay:
                await asyncio.sleep(delay)
        finally:
            cad.in_flight -= 1
        if not self.cad.up:
            raise AdapterUnavailable(f"simulated CAD of {self.cad.force} is down")
        if delivery.incident.get("category") in opts.refuse_categories:
            return Refusal(f"category {delivery.incident.get('category')!r} not accepted")
        duplicate = delivery.key in self.cad.received
        self.cad.received.setdefault(delivery.key, dict(delivery.incident))
        return Ack(reference=f"SIM-{len(self.cad.received)}", duplicate=duplicate)

    async def aclose(self) -> None:
        return None


def reset() -> None:
    """Forget every simulated CAD (between tests, or demo runs in one process)."""
    _CADS.clear()
