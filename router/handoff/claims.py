"""This router's claims on the outbox: what makes the store the queue that several routers
deliver from (`HandoffStore.claim`/`renew`/`release`).

Every second the router renews the claims it holds, letting go of those it no longer holds
(another router took them while this one could not renew, or they were answered or finished
by another router), then claims whatever no router holds: handoffs whose claim expired because
their router died. So a handoff accepted by a router that is then killed is delivered by
another within one lease and one round (`LEASE_S` + `EVERY_S`), and each handoff's delivery
and deadlines are watched by exactly one router at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from router.handoff.store import HandoffStore, Need, StoredHandoff
from router.infra import metrics

log = logging.getLogger(__name__)

EVERY_S = 1.0  # renew and look for orphans this often; a lease is several rounds
BATCH = 500  # handoffs taken in one round: a dead router's backlog comes over in a few
TIMEOUT_S = 5.0  # for one round's statements

Adopt = Callable[[list[StoredHandoff]], Awaitable[None]]


class Claims:
    """`held`: ids of the handoffs this router holds; the desk adds those it accepts or
    sends on, `adopt` hears of those claimed here, `let_go` of those no longer held."""

    def __init__(self, store: HandoffStore, need: Callable[[], Need], *, adopt: Adopt,
                 let_go: Callable[[str], None]) -> None:
        self.store = store
        self.need = need
        self.adopt = adopt
        self.let_go = let_go
        self.held: set[str] = set()
        self._failing = False

    def hold(self, hid: str) -> None:
        self.held.add(hid)
        metrics.HANDOFF_CLAIMS.set(len(self.held))

    async def start(self) -> int:
        """At start: everything no router holds, and this router's own from before a restart.
        Returns how many."""
        taken = rows = len(await self._take(mine=True))
        while rows == BATCH:  # a long backlog: the rest (the first batch is ours now)
            rows = len(await self._take(mine=False))
            taken += rows
        return taken

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    await self.round()
            except Exception as exc:  # the store is away: claims stand until their leases end
                if not self._failing:
                    log.error("handoff claims: %s; retrying every %.0f s", exc, EVERY_S)
                self._failing = True
                continue
            if self._failing:
                log.info("handoff claims renewed again")
            self._failing = False

    async def round(self) -> None:
        held = list(self.held)
        kept = await self.store.renew(held, self.need())
        for hid in held:
            if hid not in kept:
                self.held.discard(hid)
                self.let_go(hid)
        metrics.HANDOFF_CLAIMS.set(len(self.held))
        await self._take(mine=False)

    async def _take(self, *, mine: bool) -> list[StoredHandoff]:
        rows = [h for h in await self.store.claim(self.need(), limit=BATCH, mine=mine)
                if h.id not in self.held]  # one it holds, re-claimed after a stall
        if rows:
            for h in rows:
                self.hold(h.id)
            metrics.HANDOFF_TAKEN.inc(len(rows))
            log.info("claimed %d unfinished handoffs no router held", len(rows))
            await self.adopt(rows)
        return rows
