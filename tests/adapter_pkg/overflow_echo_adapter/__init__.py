"""A minimal out-of-tree CAD adapter: acknowledges every handoff, remembering what it saw."""

from __future__ import annotations

from typing import ClassVar

from adapters.base import Ack, AdapterContext, AdapterOptions, Delivery, Outcome


class EchoOptions(AdapterOptions):
    prefix: str = "ECHO-"


class EchoAdapter:
    Options = EchoOptions
    seen: ClassVar[list[str]] = []  # class-wide, so a test can look without reaching into the desk

    def __init__(self, options: EchoOptions, context: AdapterContext):
        self.options = options
        self.force = context.force

    async def deliver(self, delivery: Delivery) -> Outcome:
        EchoAdapter.seen.append(delivery.key)
        return Ack(reference=self.options.prefix + delivery.incident_id)

    async def aclose(self) -> None:
        return None
