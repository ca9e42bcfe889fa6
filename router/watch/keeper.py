"""Keeping what the watcher knows that must outlive the process, and sharing it between
routers: managers' declarations and each centre's last known state, in the operational state
store (router/infra/memory.py).

- A declaration is written when it is made or ended (`remember`, awaited by the HTTP handler
  so a 200 means it is on disk), and read back at start: a restart, even a crash, resumes
  exactly what was declared. One that cannot be written stands in memory, is retried when the
  store answers again, and the response says so (`remembered: false`).
- Other routers on the same PostgreSQL hear each write (NOTIFY) and apply it; the store is the
  truth whenever it is (re)opened, after this router's own unsaved changes are written.
- Each centre's state is saved every few seconds. After a start, the last known states (if
  recent) stand for centres with no evidence of their own yet, for at most `RECALL_FOR_S`, so
  a declared-down centre's calls go to partners from the first call, not home as a last resort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from router.engine.model import CentreState, CentreView
from router.infra.memory import Memory, Unremembered
from router.watch.health import Override
from router.watch.watcher import Watcher

log = logging.getLogger(__name__)

DECLARATION, CENTRE = "declaration/", "centre/"
SAVE_EVERY_S = 5.0
RESAVE_S = 60.0  # an unchanged state is written again this often, so its age stays honest
RECALL_MAX_AGE_S = 900.0  # older last known states are not recalled
RECALL_FOR_S = 30.0  # recalled states stand at most this long after a start
SYNC = "*"  # work item: read everything again


class Keeper:
    def __init__(self, watcher: Watcher, memory: Memory, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.watcher = watcher
        self.memory = memory
        self._clock = clock
        self._wall = wall_clock
        self._unsaved: set[str] = set()  # forces whose declaration the store has not got
        self._saved: dict[str, tuple[dict[str, Any], float]] = {}  # centre → (state, at)
        self._todo: asyncio.Queue[str] = asyncio.Queue()
        self._recalled = False
        self.ready = asyncio.Event()  # the first read back is done (or the store is away)
        memory.on_change(self._todo.put_nowait)

    async def run(self) -> None:
        """Open the store (retrying), then apply what others write and save states, until
        cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.memory.keep_open(lambda: self._todo.put_nowait(SYNC)),
                           name="state-store")
            tg.create_task(self._save_states(), name="state-save")
            while True:
                key = await self._todo.get()
                try:
                    await (self._sync() if key == SYNC else self._apply_key(key))
                except Unremembered as exc:
                    log.error("operational state: %s", exc)
                if key == SYNC:
                    self.ready.set()

    async def remember(self, force: str) -> bool:
        """Write `force`'s declaration as it stands now (or its end); False if the store did
        not take it (it is kept in memory and written once the store answers)."""
        self._unsaved.add(force)
        if not self.memory.available:
            return False
        try:
            await self.memory.put(DECLARATION + force, self._record(force))
        except Unremembered as exc:
            log.error("declaration for %s holds in memory only: %s", force, exc)
            return False
        self._unsaved.discard(force)
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.memory.close()

    # ---- reading back --------------------------------------------------------------------

    async def _sync(self) -> None:
        for force in list(self._unsaved):  # ours first: made while the store was away
            await self.memory.put(DECLARATION + force, self._record(force))
            self._unsaved.discard(force)
        stored = await self.memory.items(DECLARATION)
        for force in self.watcher.snapshot.centres:
            self._restore(force, stored.get(force))
        if not self._recalled:
            self._recalled = True
            self._recall(await self.memory.items(CENTRE))

    async def _apply_key(self, key: str) -> None:
        if key.startswith(DECLARATION):
            force = key.removeprefix(DECLARATION)
            if force not in self._unsaved:
                stored = await self.memory.items(DECLARATION)
                self._restore(force, stored.get(force))

    def _restore(self, force: str, record: dict[str, Any] | None) -> None:
        if force in self._unsaved or force not in self.watcher.snapshot.centres:
            return
        try:
            override = None if record is None else self._override(record)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("stored declaration for %s is unreadable (%s); ignored", force, exc)
            return
        self.watcher.restore_override(force, override)

    def _recall(self, centres: dict[str, dict[str, Any]]) -> None:
        wall, now = self._wall(), self._clock()
        views = {}
        for force, seen in centres.items():
            try:
                age = wall - float(seen["at"])
                state = CentreState(seen["state"])
                if age > RECALL_MAX_AGE_S or state is CentreState.UNKNOWN:
                    continue
                views[force] = CentreView(state, bool(seen["telephony_up"]),
                                          bool(seen["cad_up"]), now - age)
            except (KeyError, TypeError, ValueError):
                continue
        if views:
            log.info("until they report: last known states of %s",
                     ", ".join(f"{f} {v.state.value}" for f, v in sorted(views.items())))
            self.watcher.recall(views, RECALL_FOR_S)

    # ---- writing -------------------------------------------------------------------------

    async def _save_states(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if not self.memory.available:
                continue
            for force in list(self._unsaved):  # a write that failed with the store still up
                await self.remember(force)
            wall = self._wall()
            for force, view in self.watcher.snapshot.centres.items():
                if view.state is CentreState.UNKNOWN or view.declared:
                    continue
                seen = {"state": view.state.value, "telephony_up": view.telephony_up,
                        "cad_up": view.cad_up}
                before = self._saved.get(force)
                if before is not None and before[0] == seen and wall - before[1] < RESAVE_S:
                    continue
                try:
                    await self.memory.put(CENTRE + force, {**seen, "at": wall})
                except Unremembered as exc:
                    log.warning("last known state of %s not saved: %s", force, exc)
                    break
                self._saved[force] = (seen, wall)

    # ---- wall-clock records ↔ the watcher's clock ------------------------------------------

    def _record(self, force: str) -> dict[str, Any] | None:
        override = self.watcher.overrides().get(force)
        if override is None:
            return None
        return {"state": override.state.value, "reason": override.reason,
                "source": override.source,
                "declared_at": self.watcher.wall_time(override.declared_at),
                "expires_at": (None if override.expires_at is None
                               else self.watcher.wall_time(override.expires_at))}

    def _override(self, record: dict[str, Any]) -> Override | None:
        """The stored declaration on this process's clock; None once it has expired."""
        now, wall = self._clock(), self._wall()
        expires = record.get("expires_at")
        if expires is not None and float(expires) <= wall:
            return None
        return Override(CentreState(record["state"]), str(record["reason"]),
                        str(record["source"]), now - (wall - float(record["declared_at"])),
                        None if expires is None else now + (float(expires) - wall))
