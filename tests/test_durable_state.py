"""What matters to a call survives the router: declarations and the last known states come
back after SIGTERM and SIGKILL of a real process; two routers on one PostgreSQL share
declarations at once; and a database that goes away (a real PostgreSQL behind a TCP proxy we
cut) never stops call routing, while handoffs get 503 with Retry-After and nothing accepted
is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from conftest import Broker, free_port, need
from handoff_support import incident, wait_for
from service_support import (
    MANAGER,
    TOKENS,
    healthy_telemetry,
    make_config,
    router_process,
    running_service,
    until_up,
)

MET_DOWN = {"state": "down", "reason": "CAD and phones failed"}


def headers(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_a_declaration_and_the_partners_states_survive_the_process(
        tmp_path: Path, broker: Broker, how: signal.Signals) -> None:
    config = make_config(tmp_path, mqtt_port=broker.port)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    partners = ["kent", "surrey", "essex", "tvp", "herts", "city", "sussex"]
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        with router_process(config, port, tmp_path / "router.log") as proc:
            await until_up(session, base)
            telemetry = asyncio.create_task(healthy_telemetry(broker.port, partners, stop))
            for _ in range(100):
                async with session.get(f"{base}/v1/forces", headers=headers("viewer")) as r:
                    board = (await r.json())["forces"]
                if all(board[p]["state"] == "normal" for p in partners):
                    break
                await asyncio.sleep(0.1)
            async with session.put(f"{base}/v1/forces/met/override", json=MET_DOWN,
                                   headers=headers("manager")) as resp:
                assert resp.status == 200 and (await resp.json())["remembered"] is True
            await asyncio.sleep(6)  # the partners' states are saved every 5 s
            stop.set()
            await telemetry
            proc.send_signal(how)
            proc.wait(15)
        # no telemetry now: right after the start, partners have no evidence of their own
        with router_process(config, port, tmp_path / "router.log"):
            await until_up(session, base)
            async with session.post(f"{base}/v1/route", headers=headers("telephony"), json={
                    "call_id": "after-restart", "service": "999", "origin": "met"}) as resp:
                decision = await resp.json()
            async with session.get(f"{base}/v1/forces", headers=headers("viewer")) as resp:
                met = (await resp.json())["forces"]["met"]
    assert met["state"] == "down" and met["override"]["source"] == f"manager:{MANAGER}"
    assert met["override"]["reason"] == MET_DOWN["reason"]
    assert decision["destination"] in partners, decision  # not home, not as a last resort
    assert decision["reason"] != "last_resort"


async def test_two_routers_on_one_postgresql_share_declarations_at_once(
        tmp_path: Path, pg_dsn: str) -> None:
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        path = make_config(tmp_path / name)
        raw = yaml.safe_load(path.read_text())
        raw["handoff"]["store"] = pg_dsn
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        paths.append(path)
    async with running_service(paths[0]) as a, running_service(paths[1]) as b:
        await wait_for(lambda: a.service.runtime.keeper.memory.available  # type: ignore[union-attr]
                       and b.service.runtime.keeper.memory.available,  # type: ignore[union-attr]
                       10.0)
        status, body = await a.call("PUT", "/v1/forces/met/override", "manager", json=MET_DOWN)
        assert status == 200 and body["remembered"] is True
        began = time.monotonic()
        await wait_for(lambda: b.service.watcher.snapshot.get("met").state.value == "down", 1.0)
        shared_in = time.monotonic() - began
        status, _ = await b.call("DELETE", "/v1/forces/met/override", "manager")
        assert status == 200
        await wait_for(lambda: a.service.watcher.overrides().get("met") is None, 1.0)
    assert shared_in < 1.0


# ---- a database that goes away ----------------------------------------------------------------


class Cut:
    """A TCP proxy to PostgreSQL that can be cut (every connection dropped, new ones refused)
    and mended: the database going away as the router sees it, and coming back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def mend(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links -= {writer, up_writer}


class Cluster:
    """A private PostgreSQL cluster (initdb on a free port) that can be stopped hard
    (`pg_ctl stop -m immediate`: the server gone as after a crash) and started again: the
    database going away as it does in production, not just its connections."""

    def __init__(self) -> None:
        bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        need(bool(bindirs), "PostgreSQL's server binaries (initdb, pg_ctl)",
             "postgresql")
        self.bin = bindirs[-1].parent
        # not under pytest's tmp_path (0700): the server runs as postgres when we are root
        self.where = Path(tempfile.mkdtemp(prefix="overflow-pg-"))
        self.where.chmod(0o777)
        self.data = self.where / "pgdata"
        self.port = free_port()
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*self.user, str(self.bin / "initdb"), "-A", "trust", "-U", "postgres",
                        "-D", str(self.data)], check=True, capture_output=True)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def mend(self) -> None:
        await asyncio.to_thread(subprocess.run, [
            *self.user, str(self.bin / "pg_ctl"), "start", "-w", "-D", str(self.data),
            "-l", str(self.data / "server.log"), "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"],
            check=True, capture_output=True)

    async def cut(self) -> None:
        await asyncio.to_thread(subprocess.run, [
            *self.user, str(self.bin / "pg_ctl"), "stop", "-m", "immediate", "-D",
            str(self.data)], check=False, capture_output=True)


@pytest.fixture(params=["proxy cut", "server stopped"])
async def cut_pg(request: pytest.FixtureRequest,
                 pg_dsn: str) -> AsyncIterator[tuple[Cut | Cluster, str, str]]:
    """(the outage, the router's DSN, the direct DSN), the database away to begin: either a
    TCP proxy to the shared PostgreSQL that is cut, or a private cluster that is stopped."""
    if request.param == "server stopped":
        cluster = Cluster()
        try:
            yield cluster, cluster.dsn, cluster.dsn
        finally:
            await cluster.cut()
            shutil.rmtree(cluster.where, ignore_errors=True)
        return
    head, _, rest = pg_dsn.partition("@")
    hostport, _, db = rest.partition("/")
    cut = Cut(int(hostport.rpartition(":")[2]))
    try:
        yield cut, f"{head}@127.0.0.1:{cut.port}/{db}", pg_dsn
    finally:
        await cut.cut()


async def test_routing_goes_on_while_the_database_is_away_and_nothing_accepted_is_lost(
        tmp_path: Path, cut_pg: tuple[Cut | Cluster, str, str]) -> None:
    cut, dsn, direct = cut_pg
    path = make_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["handoff"]["store"] = dsn
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    accepted: set[str] = set()
    refused = routed = 0

    async with running_service(path) as api:  # starts with the database away
        async def hand_over(n: int) -> None:
            nonlocal refused
            async with api.session.post(f"{api.base}/v1/handoffs", json=incident(n),
                                        headers=api.auth("partner:kent")) as resp:
                if resp.status in (200, 202):
                    accepted.add((await resp.json())["id"])
                else:
                    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
                    refused += 1

        async def route(n: int) -> None:
            nonlocal routed
            status, decision = await api.call("POST", "/v1/route", "telephony", json={
                "call_id": f"c{n}", "service": "999", "origin": "met"})
            assert status == 200 and decision["destination"], decision
            routed += 1

        await hand_over(0)
        assert refused == 1
        status, body = await api.call("PUT", "/v1/forces/met/override", "manager",
                                      json=MET_DOWN)
        assert status == 200 and body["remembered"] is False  # in memory until it is back
        await route(0)

        await cut.mend()
        await wait_for(lambda: api.service.runtime.desk is not None, 40)
        n = 1
        for phase, (phase_s, mended) in enumerate(((5.0, True), (30.0, False), (5.0, True))):
            if not mended:
                await cut.cut()
            elif phase:
                await cut.mend()
            ends = time.monotonic() + phase_s
            while time.monotonic() < ends:  # 10 routes and 2 handoffs a tick, bounded
                await asyncio.gather(*(route(n * 10 + i) for i in range(10)),
                                     hand_over(n), hand_over(10_000 + n))
                n += 1
                await asyncio.sleep(0.1)
        await wait_for(lambda: api.service.runtime.desk is not None, 40)
        await hand_over(99_999)  # back to normal

    conn = await asyncpg.connect(direct, timeout=5)
    try:
        stored = {r["id"] for r in await conn.fetch("SELECT id FROM handoffs")}
        declared = await conn.fetchval(
            "SELECT value FROM operational_state WHERE key = 'declaration/met'")
    finally:
        await conn.close()
    assert accepted and accepted <= stored  # every 202 is on disk
    assert refused > 1 and routed > 300
    assert json.loads(declared)["state"] == "down"  # written once the database came back


# ---- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs to fill up (needs root to mount; CI runs as root)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                             capture_output=True, check=False)
    need(mounted.returncode == 0, f"a tmpfs to fill ({mounted.stderr.decode().strip()})",
         "run as root (CI does)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_disk_refuses_handoffs_with_503_and_routing_goes_on(
        tmp_path: Path, small_disk: Path) -> None:
    path = make_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["handoff"]["store"] = f"sqlite:///{small_disk / 'handoffs.db'}"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    accepted: set[str] = set()
    async with running_service(path) as api:
        async def hand_over(n: int) -> int:
            async with api.session.post(f"{api.base}/v1/handoffs", json=incident(n),
                                        headers=api.auth("partner:kent")) as resp:
                if resp.status in (200, 202):
                    accepted.add((await resp.json())["id"])
                else:
                    assert int(resp.headers["Retry-After"]) >= 1
                return resp.status

        assert await hand_over(0) == 202
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:  # the rest of the disk
            while True:
                out.write(b"\0" * 65536)
        statuses = [await hand_over(n) for n in range(1, 200)]
        assert 503 in statuses  # refused once the disk is full: never a 500, never a crash
        for n in range(20):
            status, decision = await api.call("POST", "/v1/route", "telephony", json={
                "call_id": f"full-{n}", "service": "999", "origin": "met"})
            assert status == 200 and decision["destination"]
        filler.unlink()  # space again: handoffs are taken again
        for n in range(1000, 1100):
            if await hand_over(n) == 202:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("handoffs still refused once the disk had room again")
        for hid in accepted:  # every 202, before and after, is on record
            status, _ = await api.call("GET", f"/v1/handoffs/{hid}", "viewer")
            assert status == 200
