"""Tamper-evident audit log: one JSON line per declaration, clear, expiry, state change, config
reload and handoff escalation, each chained to the one before it by SHA-256.

Answers "who diverted the Met's 999 calls, when and why" after the fact, and whether the file
was edited since. Record n carries `seq` n, `prev` (record n-1's `hash`, GENESIS for the first)
and `hash`: the SHA-256 of the record without `hash` as canonical JSON (sorted keys, compact
separators, UTF-8). Editing, removing, reordering or inserting a line breaks the chain there,
and `verify` (`overflow-router audit verify FILE`) names the line. Cutting lines off the end, or
rewriting everything from some line on, cannot be seen in the file alone: keep the last hash
that verify prints somewhere else, to compare.

Lines are written by a thread per log, never on the event loop (an fsync on a busy disk takes
tens of milliseconds or more): `record` only queues. The thread appends whatever has queued in
one write, then fsyncs, so a record is in the file, and survives a crash, milliseconds after
`record` returns; a reader in the same process that needs it at once calls `sync()` first.
Nothing is ever rewritten.

On open the chain continues from the file's last complete record. A crash in the middle of an
append leaves a torn last line: the next open ends it with a newline and chains a `torn_tail`
record carrying its digest, so verify tells a crash from tampering. Lines from before the log
was chained (no `hash`) are kept, and the chain starts after them from GENESIS. One process
appends to a file at a time.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

from router.infra.timefmt import iso

log = logging.getLogger(__name__)

Kind = Literal["declaration", "clear", "expiry", "state_change"]  # about a force's state
EventKind = Literal["reload", "escalation", "answer", "paper"]  # about the service and handoffs
GENESIS = "0" * 64  # the `prev` of a chain's first record
CLOSE_TIMEOUT_S = 5.0  # for the writer to append and fsync what is queued
MAX_BATCH = 256  # records per append and fsync


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: the record without `hash`."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


class AuditLog:
    def __init__(self, path: Path, *, wall_clock: Callable[[], float] = time.time):
        self.path = path
        self._wall = wall_clock
        self._writer: _Writer | None = None
        self._lock = threading.Lock()

    def record(self, kind: Kind, *, force: str, before: str, after: str, source: str,
               reason: str, **extra: Any) -> dict[str, Any]:
        """Queue one record, `{time, kind, force, from, to, source, reason, ...}`; returned
        without the chain fields, which the writer adds."""
        return self._queue({"time": iso(self._wall()), "kind": kind, "force": force,
                            "from": before, "to": after, "source": source, "reason": reason,
                            **extra})

    def event(self, kind: EventKind, *, source: str, reason: str, force: str | None = None,
              **extra: Any) -> dict[str, Any]:
        """Queue a record about the service rather than a centre's state: `{time, kind, force
        (null unless one force is concerned), source, reason, ...}`."""
        return self._queue({"time": iso(self._wall()), "kind": kind, "force": force,
                            "source": source, "reason": reason, **extra})

    def move(self, path: Path) -> None:
        """Append to `path` from the next record on (a reload changed `service.audit_log`);
        what was queued before goes to the old file. Each file has its own chain."""
        with self._lock:
            if path != self.path:
                self.path = path
                if self._writer is not None:
                    self._writer.put(("move", path))

    def sync(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Block until everything queued so far is written and fsynced; False on timeout.
        Not for the event loop: for tests, and tools that read the file back."""
        with self._lock:
            writer = self._writer
        if writer is None:
            return True
        done = threading.Event()
        writer.put(("sync", done))
        return done.wait(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and stop the writer (a later record starts another). Blocks
        for the last append and fsync: off the event loop, please."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is None:
            return
        atexit.unregister(writer.stop)
        if not writer.stop(timeout):
            log.error("audit log %s: the writer did not finish within %.0f s; records still "
                      "queued may be lost", writer.path, timeout)

    def _queue(self, entry: dict[str, Any]) -> dict[str, Any]:
        # serialised here, so the writer never reads objects the loop may still change
        text = json.dumps(entry, ensure_ascii=False, default=str)
        with self._lock:
            if self._writer is None:
                self._writer = _Writer(self.path, self._wall)
                self._writer.start()
                atexit.register(self._writer.stop)  # an exit without close() still writes
            self._writer.put(("record", text))
        return entry


Op = tuple[Literal["record", "move", "sync", "stop"], Any]


class _Writer(threading.Thread):
    """Owns the open file and its chain; appends what has queued in one write, then fsyncs."""

    def __init__(self, path: Path, wall_clock: Callable[[], float]):
        super().__init__(name=f"audit-writer:{path.name}", daemon=True)
        self.path = path
        self._wall = wall_clock
        self._ops: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._fd: int | None = None
        self._seq, self._prev = 0, GENESIS
        self._pending = b""  # written before the next record: the newline a torn line lacks
        self._records: list[dict[str, Any]] = []  # chained, not yet written
        self._lines: list[bytes] = []

    def put(self, op: Op) -> None:
        self._ops.put(op)

    def stop(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        if self.is_alive():
            self.put(("stop", None))
            self.join(timeout)
        return not self.is_alive()

    def run(self) -> None:
        while True:
            ops = [self._ops.get()]
            while len(ops) < MAX_BATCH:
                try:
                    ops.append(self._ops.get_nowait())
                except queue.Empty:
                    break
            for op, arg in ops:
                try:
                    if op == "record":
                        self._chain(json.loads(arg.encode("utf-8", "replace")))
                        continue
                    self._write()
                    if op == "sync":
                        arg.set()
                    elif op == "move":
                        self._close()
                        self.path = arg
                    else:  # stop
                        self._close()
                        return
                except Exception:  # a writer that dies would lose every later record
                    log.exception("audit log %s: %s failed", self.path, op)
            self._write()

    def _chain(self, entry: dict[str, Any]) -> None:
        """Add `entry` (as JSON would read it back, so its hash checks) to the next append."""
        if self._fd is None and not self._open():
            log.error("audit log %s not written: %s", self.path, entry)
            return
        self._seq += 1
        record = {"seq": self._seq, **entry, "prev": self._prev}
        record["hash"] = self._prev = digest(record)
        self._records.append(record)
        self._lines.append(json.dumps(record, separators=(",", ":"),
                                      ensure_ascii=False).encode("utf-8") + b"\n")

    def _write(self) -> None:
        if not self._lines or self._fd is None:
            return
        data = self._pending + b"".join(self._lines)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self._pending = b""
        except OSError as exc:  # the audit trail must not stop routing: shout, keep going
            log.error("audit log %s not written (%s): %s", self.path, exc, self._records)
            self._close()  # the next record resumes from what the file really holds
        self._records, self._lines = [], []

    def _open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            if created:  # the file's name must survive a crash too
                _fsync_dir(self.path.parent)
            torn = self._resume(self._fd)
        except OSError as exc:
            log.error("audit log %s cannot be opened: %s", self.path, exc)
            self._close()
            return False
        if torn:
            log.warning("audit log %s ends in %d torn line(s) (a crash?); the chain resumes "
                        "from seq %d", self.path, len(torn), self._seq)
            cut = b"\n".join(torn)
            self._chain({"time": iso(self._wall()), "kind": "torn_tail", "force": None,
                         "source": "audit log",
                         "reason": f"the line(s) before were cut short by a crash; the chain "
                                   f"resumes from seq {self._seq}",
                         "torn_lines": len(torn), "torn_bytes": len(cut),
                         "torn_sha256": hashlib.sha256(cut).hexdigest()})
        return True

    def _resume(self, fd: int) -> list[bytes]:
        """Continue the chain from the file's last complete record; the lines after it."""
        self._seq, self._prev, self._pending = 0, GENESIS, b""
        lines = _backwards(fd, os.fstat(fd).st_size)
        tail = next(lines)
        if tail:
            self._pending = b"\n"  # whatever it is, the next record starts a line of its own
        torn = []
        for line in itertools.chain([tail] if tail else [], lines):
            record = _parse(line)
            if record is not None:
                seq, hashed = record.get("seq"), record.get("hash")
                if _is_seq(seq) and isinstance(hashed, str):
                    self._seq, self._prev = seq, hashed
                break  # else from before the log was chained: a new chain, from GENESIS
            torn.append(line)
        return torn[::-1]

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as exc:
                log.error("audit log %s: closing: %s", self.path, exc)
            self._fd = None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backwards(fd: int, size: int, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The file's lines from the last to the first, without newlines; the first one yielded
    is what follows the last newline (empty when the file ends with one)."""
    pos, rest = size, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        parts = (os.pread(fd, step, pos) + rest).split(b"\n")
        rest = parts[0]
        yield from reversed(parts[1:])
    yield rest


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _is_seq(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record, oldest first; not checked (that is `verify`)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash


# ---- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Break:
    """The first line where the chain does not hold."""

    line: int
    seq: int  # the record's own, or the one expected there when it has none
    problem: str


@dataclass
class Verdict:
    path: Path
    records: int = 0  # chained records that hold
    last_hash: str = GENESIS
    broken: Break | None = None
    unchained: int = 0  # lines from before the log was chained
    torn: list[int] = field(default_factory=list)  # lines cut short by a crash, each noted
    torn_tail: int | None = None  # the last line, cut short by a crash

    @property
    def intact(self) -> bool:
        return self.broken is None

    def summary(self) -> str:
        if self.broken is not None:
            b = self.broken
            return f"{self.path}:{b.line}: record seq {b.seq}: {b.problem}"
        notes = [f"{self.path}: {self.records} records, chain intact (last hash {self.last_hash})"]
        if self.unchained:
            notes.append(f"{self.unchained} lines from before the chain began")
        if self.torn:
            notes.append(f"line {', '.join(map(str, self.torn))} cut short by a crash "
                         "(noted by the torn_tail record after)")
        if self.torn_tail is not None:
            notes.append(f"torn tail at line {self.torn_tail}: a record cut short by a "
                         "crash, not counted")
        return "; ".join(notes)


def verify(path: Path) -> Verdict:
    """Check the chain in the file at `path`, line by line; OSError if it cannot be read."""
    with path.open("rb") as f:
        return _Checker(Verdict(path)).run(enumerate(f, 1))


class _Checker:
    def __init__(self, verdict: Verdict):
        self.v = verdict
        self.expected = 1
        self.prev_line = 0
        self.torn: list[tuple[int, bytes]] = []  # lines that are not JSON, since the last record

    def run(self, lines: Iterator[tuple[int, bytes]]) -> Verdict:
        for number, raw in lines:
            body = raw.removesuffix(b"\n")
            record = _parse(body)
            if record is None:
                self.torn.append((number, body))
                continue
            broken = self._check(number, record, lines)
            if broken is not None:
                self.v.broken = broken
                return self.v
        if len(self.torn) == 1:  # the last line: a crash in the middle of its append
            self.v.torn_tail = self.torn[0][0]
        elif self.torn:
            self.v.broken = Break(self.torn[0][0], self.expected, "not JSON")
        return self.v

    def _check(self, number: int, record: dict[str, Any],
               rest: Iterator[tuple[int, bytes]]) -> Break | None:
        started = self.v.records > 0
        if not {"seq", "prev", "hash"} & record.keys():
            if started and self.torn:
                return Break(self.torn[0][0], self.expected, "not JSON")
            if started:
                return Break(number, self.expected, "no seq, prev or hash: a line inserted")
            self.v.unchained += len(self.torn) + 1  # the file before it was chained
            self.torn = []
            return None
        if self.torn:
            cut = b"\n".join(body for _, body in self.torn)
            if (record.get("kind") == "torn_tail" and record.get("torn_lines") == len(self.torn)
                    and record.get("torn_sha256") == hashlib.sha256(cut).hexdigest()):
                self.v.torn.extend(line for line, _ in self.torn)
            elif started:
                return Break(self.torn[0][0], self.expected, "not JSON")
            else:
                self.v.unchained += len(self.torn)
            self.torn = []
        seq, prev, hashed = record.get("seq"), record.get("prev"), record.get("hash")
        if not (_is_seq(seq) and isinstance(prev, str) and isinstance(hashed, str)):
            return Break(number, self.expected, "seq, prev or hash missing or malformed")
        if hashed != digest(record):
            return Break(number, seq, "hash mismatch: the record was edited after it was written")
        if prev != self.v.last_hash:
            before = (f"the hash of record seq {self.expected - 1} (line {self.prev_line})"
                      if started else "the genesis value")
            return Break(number, seq, f"prev does not match {before}: {self._why(seq, rest)}")
        if seq != self.expected:
            return Break(number, seq, f"seq gap: expected seq {self.expected}")
        self.v.records += 1
        self.v.last_hash = hashed
        self.expected = seq + 1
        self.prev_line = number
        return None

    def _why(self, seq: int, rest: Iterator[tuple[int, bytes]]) -> str:
        e = self.expected
        if seq < e:
            return f"seq {seq} again after seq {e - 1}: a record inserted or replayed"
        if seq == e:
            return "a record inserted or replaced here"
        if any(r.get("seq") == e for _, raw in rest
               if (r := _parse(raw.removesuffix(b"\n"))) is not None):
            return f"seq {e} comes later in the file: records reordered"
        missing = f"seq {e}" if seq == e + 1 else f"seq {e} to {seq - 1}"
        return f"{missing} missing: records removed"
