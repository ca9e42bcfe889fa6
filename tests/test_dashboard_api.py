"""What the dashboard reads and does, over real HTTP: a handoff handled on paper, the live
stream (tickets, pushes, limits, shutdown), the audit timeline and a partner's view."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from handoff_support import incident
from service_support import MANAGER, Running, make_config, running_service

from adapters.sim import sim_cad
from router.http import events
from router.http.timeline import tail


@pytest.fixture
def met_cad_down() -> Iterator[None]:
    sim_cad("met").up = False
    try:
        yield
    finally:
        sim_cad("met").up = True


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.read())


async def _handoff(run: Running, n: int) -> str:
    for _ in range(100):  # the desk may still be opening: 503, retry
        async with run.session.post(f"{run.base}/v1/handoffs", json=incident(n, "kent", "met"),
                                    headers=run.auth("partner:kent")) as resp:
            if resp.status != 503:
                assert resp.status == 202, await resp.text()
                return str((await _json(resp))["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("the handoff desk did not open")


async def _status(run: Running, hid: str) -> dict[str, Any]:
    async with run.session.get(f"{run.base}/v1/handoffs/{hid}",
                               headers=run.auth("viewer")) as resp:
        return dict(await _json(resp))


async def test_handled_on_paper_is_final_told_and_audited(tmp_path: Path,
                                                          met_cad_down: None) -> None:
    told: list[dict[str, Any]] = []
    async with running_service(make_config(tmp_path)) as run:
        run.service.status_listeners.append(told.append)
        sim_cad("met").up = False  # the adapter, built as the service starts, starts up
        hid = await _handoff(run, 1)
        for _ in range(100):
            if (await _status(run, hid))["status"] == "held":
                break
            await asyncio.sleep(0.05)
        assert (await _status(run, hid))["status"] == "held"
        url = f"{run.base}/v1/handoffs/{hid}/paper"
        body = {"reason": "phoned to the Met's duty officer"}
        async with run.session.post(url, json=body, headers=run.auth("partner:kent")) as resp:
            assert resp.status == 403  # a manager's word only
        async with run.session.post(url, json=body, headers=run.auth("manager")) as resp:
            assert resp.status == 200, await resp.text()
            handoff = await _json(resp)
        assert handoff["status"] == "on_paper"
        assert handoff["history"][-1] | {"at": None} == {
            "at": None, "status": "on_paper", "by": MANAGER, "note": body["reason"],
            "detail": f"handled on paper by {MANAGER}: {body['reason']}"}
        async with run.session.post(url, json=body, headers=run.auth("manager")) as resp:
            assert resp.status == 409  # final: nothing left to stop
        sim_cad("met").up = True  # the CAD is back: nothing more is delivered
        run.service.runtime.desk.cad_state_changed("met", True)  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
        assert (await _status(run, hid))["status"] == "on_paper"
        assert hid not in sim_cad("met").received
        assert [m["status"] for m in told if m["handoff_id"] == hid][-1] == "on_paper"
        for _ in range(50):  # the audit writer is a thread: its line lands a moment later
            async with run.session.get(f"{run.base}/v1/audit?kind=paper",
                                       headers=run.auth("viewer")) as resp:
                records = (await _json(resp))["records"]
            if records:
                break
            await asyncio.sleep(0.05)
        assert records[0]["handoff_id"] == hid and records[0]["source"] == f"manager:{MANAGER}"
        async with run.session.get(f"{run.base}/v1/handoffs/{hid}/sheet",
                                   headers=run.auth("viewer")) as resp:
            assert resp.status == 200 and "ESCALATED INCIDENT HANDOFF" in await resp.text()


class Stream:
    """An SSE stream read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse):
        self.resp = resp

    async def next(self, within_s: float = 5.0) -> tuple[str, Any]:
        event, data = "", ""
        async with asyncio.timeout(within_s):
            while True:
                line = (await self.resp.content.readline()).decode()
                if not line:
                    raise EOFError("stream ended")
                line = line.rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and event:
                    return event, json.loads(data)


async def _ticket(run: Running, role: str) -> dict[str, Any]:
    async with run.session.post(f"{run.base}/v1/events/ticket", headers=run.auth(role)) as resp:
        assert resp.status == 201
        return dict(await _json(resp))


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_service(make_config(tmp_path)) as running:
        yield running


async def test_the_stream_pushes_a_declaration_within_a_second(run: Running) -> None:
    ticket = await _ticket(run, "viewer")
    assert ticket["role"] == "viewer"
    url = f"{run.base}/v1/events?ticket={ticket['ticket']}"
    async with run.session.get(url) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        stream = Stream(resp)
        assert (await stream.next())[0] == "hello"
        kind, board = await stream.next()
        assert kind == "board" and set(board["forces"]) == set(run.service.config.forces)
        async with run.session.get(url) as again:  # a ticket is used once
            assert again.status == 403
        started = time.monotonic()
        async with run.session.put(f"{run.base}/v1/forces/tvp/override", json={
                "state": "down", "reason": "test"}, headers=run.auth("manager")) as put:
            assert put.status == 200
        while True:
            kind, board = await stream.next(1.0)
            if kind == "board" and board["forces"]["tvp"]["state"] == "down":
                break
        assert time.monotonic() - started < 1.0
        assert all(s["reason"] != "home" for s in board["routing"]["tvp"]["999"])


async def test_a_partner_stream_shows_what_comes_to_it(run: Running) -> None:
    for force, state in (("kent", "normal"), ("met", "down")):  # no probes: declared
        async with run.session.put(f"{run.base}/v1/forces/{force}/override", json={
                "state": state, "reason": "test"}, headers=run.auth("manager")) as put:
            assert put.status == 200
    ticket = await _ticket(run, "partner:kent")
    assert (ticket["role"], ticket["force"]) == ("partner", "kent")
    async with run.session.get(f"{run.base}/v1/events?ticket={ticket['ticket']}") as resp:
        stream = Stream(resp)
        await stream.next()
        kind, board = await stream.next()
    assert kind == "board" and "forces" not in board  # nothing of other forces' boards
    assert {(s["origin"], s["service"]) for s in board["incoming"]} >= {("met", "999")}
    async with run.session.get(f"{run.base}/v1/incoming", headers=run.auth("partner:kent")) as r:
        assert (await _json(r))["force"] == "kent"


async def test_streams_are_bounded_and_end_at_shutdown(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_CLIENTS", 2)
    started = 0.0
    async with running_service(make_config(tmp_path)) as run:
        opened = []
        for _ in range(2):
            ticket = await _ticket(run, "viewer")
            resp = await run.session.get(f"{run.base}/v1/events?ticket={ticket['ticket']}")
            await Stream(resp).next()
            opened.append(resp)
        ticket = await _ticket(run, "viewer")
        async with run.session.get(f"{run.base}/v1/events?ticket={ticket['ticket']}") as full:
            assert full.status == 503
        started = time.monotonic()
    assert time.monotonic() - started < 3.0  # the open streams did not hold the shutdown up
    for resp in opened:
        resp.close()


def test_the_audit_tail_reads_backwards_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = [json.dumps({"seq": n, "kind": "state_change" if n % 2 else "declaration",
                         "force": "met"}) for n in range(5000)]
    path.write_text("\n".join(lines) + '\n{"seq": 5000, "kind": "tor')
    got = tail(path, 3)
    assert [r["seq"] for r in got] == [4999, 4998, 4997]
    assert [r["seq"] for r in tail(path, 2, kind="declaration")] == [4998, 4996]
    assert len(tail(path, 500)) == 500
    assert tail(tmp_path / "missing.jsonl", 5) == []
