"""Append-only audit log: one JSON line per declaration and per state change.

Answers "who diverted the Met's 999 calls, when and why" after the fact. Lines are appended
and flushed as they happen (a few a minute at most, so the write does not stall the loop);
nothing is ever rewritten. Readers tolerate a torn last line from a crash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from router.infra.timefmt import iso

log = logging.getLogger(__name__)

Kind = Literal["declaration", "clear", "expiry", "state_change"]


class AuditLog:
    def __init__(self, path: Path, *, wall_clock: Any = time.time):
        self.path = path
        self._wall = wall_clock
        self._file: IO[str] | None = None

    def record(self, kind: Kind, *, force: str, before: str, after: str, source: str,
               reason: str, **extra: Any) -> dict[str, Any]:
        """Append one record: `{time, kind, force, from, to, source, reason, ...}`."""
        entry: dict[str, Any] = {"time": iso(self._wall()), "kind": kind, "force": force,
                                 "from": before, "to": after, "source": source,
                                 "reason": reason, **extra}
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:  # the audit trail must not stop routing: shout, keep going
            log.error("audit log %s not written (%s): %s", self.path, exc, entry)
        return entry

    def move(self, path: Path) -> None:
        """Append to `path` from the next record on (a reload changed `service.audit_log`)."""
        if path != self.path:
            self.close()
            self.path = path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record, oldest first."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
