"""Shared fixtures: real services, started privately where we can, skipped only off CI.

Under CI (`OVERFLOW_REQUIRE_SERVICES=1`, set by .ci/run) a missing service fails the test
instead of skipping it, so a green CI run always means the real thing was exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

REQUIRE = os.environ.get("OVERFLOW_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parent.parent


def need(ok: bool, what: str, install: str) -> None:
    """Skip (or fail under CI) when a real component is missing, naming what to install."""
    if ok:
        return
    message = f"{what} is not available: install {install}"
    if REQUIRE:
        pytest.fail(f"{message} (OVERFLOW_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(message)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[int]:
    """`app` on a free loopback port for the block; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Broker:
    """A private Mosquitto on a free loopback port, which a test may stop and start again."""

    port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def private_broker() -> Iterator[Broker]:
    """A Mosquitto of the test's own, stopped on exit; a test may hold several."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                           if Path("/usr/sbin/mosquitto").exists() else None)
    need(binary is not None, "the mosquitto binary", "Debian's mosquitto package")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        b = Broker(port, conf)
        b.start()
        try:
            yield b
        finally:
            b.stop()


@pytest.fixture
def broker() -> Iterator[Broker]:
    with private_broker() as b:
        yield b


PG_DSN = os.environ.get("OVERFLOW_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database, dropped afterwards."""
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio

    name = f"overflow_test_{uuid.uuid4().hex[:12]}"
    base, _, _ = PG_DSN.rpartition("/")

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        need(False, f"PostgreSQL at {PG_DSN} ({exc})", "postgresql and start it")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The handoff store (and the state beside it) in SQLite, then in a fresh PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'handoffs.db'}"
    return str(request.getfixturevalue("pg_dsn"))


async def stop_task(task: asyncio.Task[object]) -> None:
    """Cancel a task and wait for it, cancelling again if it swallowed the first cancel:
    on Python 3.11 aiomqtt's `wait_for`-timed calls can drop a cancellation that arrives as
    the call completes (fixed in 3.12), which would leave a plain `await task` hanging."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(BaseException):
        task.result()
