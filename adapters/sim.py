"""An in-process simulated CAD, for the demo and for tests of the desk itself.

It acknowledges after a configurable latency, refuses categories it is told to, and can be
switched down and up (`sim_cad(force).up = False`) to show a held backlog draining. It keeps
what it received keyed by idempotency key, as a real CAD would, so a redelivery is reported
as a duplicate rather than counted twice.

Its dispatchers answer too, when asked (all off by default): `ack_after_s` after a first
delivery (± `answer_jitter_s`, uniformly) one accepts it, or rejects it with `reject_cause`
for a `reject_share` of handoffs; `complete_after_s` after an acceptance it is completed.
Answers go to `context.answer` from tasks the adapter owns (cancelled by `aclose`), wait
while the CAD is down, and are recorded on the SimCad: `answers`, and `ack_delays_s`, the
seconds from delivery to a recorded acknowledgement or rejection, for the bench.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from adapters.base import (
    Ack,
    AdapterContext,
    AdapterOptions,
    AdapterUnavailable,
    Answer,
    AnswerRefused,
    Delivery,
    Outcome,
    Refusal,
    pass_answer,
)

log = logging.getLogger(__name__)


class SimOptions(AdapterOptions):
    latency_s: float = Field(default=0.002, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    up: bool = True
    refuse_categories: tuple[str, ...] = ()
    ack_after_s: float | None = Field(default=None, ge=0)  # None: dispatchers never answer
    complete_after_s: float | None = Field(default=None, ge=0)  # after the acceptance
    answer_jitter_s: float = Field(default=0.0, ge=0)
    reject_share: float = Field(default=0.0, ge=0, le=1)
    reject_cause: str = Field(default="location outside our area", min_length=1)
    seed: int | None = None  # for answers that repeat from run to run


@dataclass
class SimCad:
    force: str
    up: bool = True
    received: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> incident
    attempts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0  # the most deliveries it ever had at once
    answers: list[Answer] = field(default_factory=list)  # recorded by the router
    ack_delays_s: dict[str, float] = field(default_factory=dict)  # key -> delivery to answer
    answers_refused: int = 0


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
        self.context = context
        self._rng = random.Random(options.seed)
        self._answering: set[asyncio.Task[None]] = set()

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
        ack = Ack(reference=f"SIM-{len(self.cad.received)}", duplicate=duplicate)
        if opts.ack_after_s is not None and not duplicate:
            task = asyncio.create_task(self._dispatcher(delivery.key, ack.reference,
                                                        opts.ack_after_s),
                                       name=f"sim-dispatcher-{delivery.key}")
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        return ack

    def _after(self, mean_s: float) -> float:
        jitter = self.options.answer_jitter_s
        return max(0.0, mean_s + (self._rng.uniform(-jitter, jitter) if jitter else 0.0))

    async def _dispatcher(self, key: str, reference: str, ack_after_s: float) -> None:
        """One dispatcher's answers to one handoff: accept or reject, later complete."""
        opts, cad = self.options, self.cad
        delivered = time.monotonic()
        by = f"{cad.force}-dispatcher-{self._rng.randint(1, 12)}"
        rejects = self._rng.random() < opts.reject_share
        await asyncio.sleep(self._after(ack_after_s))
        ack = Answer(key, "acknowledgement", "rejected" if rejects else "accepted",
                     at=time.time(), by=by, reference=reference,
                     cause=opts.reject_cause if rejects else "")
        if not await self._say(ack):
            return
        cad.ack_delays_s[key] = time.monotonic() - delivered
        if rejects or opts.complete_after_s is None:
            return
        await asyncio.sleep(self._after(opts.complete_after_s))
        await self._say(Answer(key, "completion", "completed", at=time.time(), by=by,
                               reference=reference, note="attended; incident closed"))

    async def _say(self, answer: Answer) -> bool:
        while not self.cad.up:  # noqa: ASYNC110 - `up` is a plain flag the demo flips
            await asyncio.sleep(0.2)
        try:
            await pass_answer(self.context.answer, answer)
        except AnswerRefused as exc:
            self.cad.answers_refused += 1
            log.warning("simulated CAD of %s: %s of %s refused: %s", self.cad.force,
                        answer.kind, answer.handoff_id, exc)
            return False
        self.cad.answers.append(answer)
        return True

    async def aclose(self) -> None:
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)


def reset() -> None:
    """Forget every simulated CAD (between tests, or demo runs in one process)."""
    _CADS.clear()
