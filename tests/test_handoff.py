"""The handoff desk end to end on the simulated CAD: order, holds, retries, refusals,
escalation and restart. Store: SQLite in a temporary folder (and PostgreSQL for restart)."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import served
from handoff_support import Cads, inc, incident, make_config, reaches, status_of, wait_for

from adapters import sim
from adapters.sim import sim_cad
from router.handoff import delivery
from router.handoff.desk import open_desk
from router.infra import metrics


@pytest.fixture(autouse=True)
def fresh_sim_cads() -> None:
    sim.reset()


def sheets_of(alert: dict[str, Any]) -> tuple[str, str]:
    return (Path(alert["sheet"]).read_text(encoding="utf-8"),
            Path(alert["csv"]).read_text(encoding="utf-8"))


async def test_backlog_is_delivered_p1_first_then_oldest(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["met"] = False
    config = make_config(tmp_path, max_concurrency=1)
    async with open_desk(config, alert=lambda a: None, cad_up=cads) as desk:
        for n, priority in enumerate(["P4", "P3", "P1", "P2", "P1"]):
            await desk.submit(inc(n, priority=priority))
        ids = {n: (await desk.query(to="met"))[n]["id"] for n in range(5)}
        cads.up["met"] = True
        desk.cad_state_changed("met", True)
        await wait_for(lambda: len(sim_cad("met").received) == 5)
    order = [key for key in sim_cad("met").received]
    assert order == [ids[2], ids[4], ids[3], ids[1], ids[0]]


async def test_a_duplicate_submission_is_the_same_handoff(tmp_path: Path) -> None:
    async with open_desk(make_config(tmp_path), alert=lambda a: None, cad_up=Cads()) as desk:
        first, created = await desk.submit(inc(1))
        again, created_again = await desk.submit(inc(1))
        assert (created, created_again) == (True, False)
        assert first["id"] == again["id"]
        await wait_for(lambda: reaches(desk, first["id"], "delivered"))


async def test_down_cad_holds_then_drains_with_history(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["met"] = False
    async with open_desk(make_config(tmp_path), alert=lambda a: None, cad_up=cads) as desk:
        handoff, _ = await desk.submit(inc(1))
        assert handoff["status"] == "held"
        await asyncio.sleep(0.1)
        assert await status_of(desk, handoff["id"]) == "held"
        cads.up["met"] = True
        desk.cad_state_changed("met", True)
        await wait_for(lambda: reaches(desk, handoff["id"], "delivered"))
        final = await desk.get(handoff["id"])
    assert final is not None
    assert [h["status"] for h in final["history"]] == ["accepted", "held", "delivering",
                                                       "delivered"]
    assert final["delivered_at"] >= final["accepted_at"]


async def test_failing_cad_is_retried_held_and_probed_until_it_answers(tmp_path: Path) -> None:
    cad = sim_cad("essex")
    config = make_config(tmp_path)
    async with open_desk(config, alert=lambda a: None, cad_up=Cads()) as desk:
        cad.up = False  # the watcher still thinks it is up: only deliveries find out
        before = cad.attempts
        handoffs = [(await desk.submit(inc(n, to="essex")))[0] for n in range(6)]
        await wait_for(lambda: reaches(desk, handoffs[0]["id"], "held"))
        held = await desk.get(handoffs[0]["id"])
        assert held is not None and "down" in held["reason"] and held["attempts"] >= 2
        await asyncio.sleep(0.5)  # a few probe intervals: one handoff probed at a time
        probes = cad.attempts - before
        assert probes < 6 * config.handoff.retry.attempts + 6, "no thundering herd while held"
        cad.up = True
        for h in handoffs:
            await wait_for(lambda h=h: reaches(desk, h["id"], "delivered"))
    assert len([k for k in cad.received if k in {h["id"] for h in handoffs}]) == 6


async def test_refusal_is_final_with_its_reason(tmp_path: Path) -> None:
    cads = {"surrey": {"adapter": "sim", "options": {"refuse_categories": ["hoax"]}}}
    async with open_desk(make_config(tmp_path, cads=cads), alert=lambda a: None,
                         cad_up=Cads()) as desk:
        handoff, _ = await desk.submit(inc(1, to="surrey", category="hoax"))
        await wait_for(lambda: reaches(desk, handoff["id"], "failed"))
        failed = await desk.get(handoff["id"])
    assert failed is not None and "hoax" in failed["reason"]
    assert failed["history"][-1]["status"] == "failed"


async def test_late_handoff_escalates_with_alert_sheet_and_metric(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["tvp"] = False
    alerts: list[dict[str, Any]] = []
    metric = metrics.HANDOFF_OUTCOMES.labels("tvp", "escalated")
    before = metric._value.get()
    config = make_config(tmp_path, deadlines_s={"P1": 0.2, "P2": 30, "P3": 60, "P4": 60})
    async with open_desk(config, alert=alerts.append, cad_up=cads) as desk:
        urgent, _ = await desk.submit(inc(1, to="tvp", priority="P1"))
        calm, _ = await desk.submit(inc(2, to="tvp", priority="P2"))
        await wait_for(lambda: len(alerts) == 1)
        assert await status_of(desk, urgent["id"]) == "escalated"
        assert await status_of(desk, calm["id"]) == "held"
        cads.up["tvp"] = True
        desk.cad_state_changed("tvp", True)  # still delivered after escalation
        await wait_for(lambda: reaches(desk, urgent["id"], "delivered"))
        done = await desk.get(urgent["id"])
    alert = alerts[0]
    assert (alert["kind"], alert["handoff_id"], alert["priority"]) == (
        "handoff_escalated", urgent["id"], "P1")
    assert metric._value.get() == before + 1
    page, sheet_csv = sheets_of(alert)
    assert "KENT-000001" in page and "&lt;script&gt;" in page and "<script>" not in page
    rows = list(csv.DictReader(io.StringIO(sheet_csv)))
    assert rows[0]["incident_id"] == "KENT-000001" and rows[0]["to"] == "tvp"
    assert rows[0]["lon"] == "0.5" and rows[0]["caller_phone"] == "'+44 7700 900123"
    assert done is not None and "escalated_at" in done
    assert [h["status"] for h in done["history"]][-2:] == ["escalated", "delivered"]


async def test_restart_resumes_every_unfinished_handoff(tmp_path: Path, store_url: str) -> None:
    config = make_config(tmp_path, store=store_url)
    cads = Cads()
    cads.up["herts"] = False
    async with open_desk(config, alert=lambda a: None, cad_up=cads) as desk:
        ids = [(await desk.submit(inc(n, to="herts")))[0]["id"] for n in range(25)]
    received_before = set(sim_cad("herts").received)
    assert not received_before & set(ids)
    cads.up["herts"] = True
    async with open_desk(config, alert=lambda a: None, cad_up=cads) as desk:
        assert desk.backlog()["herts"] <= 25
        await wait_for(lambda: desk.backlog()["herts"] == 0)
        statuses = {h["status"] for h in await desk.query(to="herts", limit=100)}
    assert statuses == {"delivered"}
    assert set(ids) <= set(sim_cad("herts").received)


async def test_drain_respects_max_concurrency(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["sussex"] = False
    config = make_config(tmp_path, max_concurrency=3,
                         cads={"sussex": {"adapter": "sim", "options": {"latency_s": 0.02}}})
    async with open_desk(config, alert=lambda a: None, cad_up=cads) as desk:
        for n in range(30):
            await desk.submit(inc(n, to="sussex"))
        cads.up["sussex"] = True
        desk.cad_state_changed("sussex", True)
        await wait_for(lambda: desk.backlog()["sussex"] == 0)
    assert sim_cad("sussex").max_in_flight == 3


async def test_unknown_adapter_or_bad_options_fail_at_start(tmp_path: Path) -> None:
    from adapters.base import AdapterConfigError

    bad = {"kent": {"adapter": "http_json", "options": {"url": "ftp://x", "colour": "red"}},
           "met": {"adapter": "telepathy"}}
    with pytest.raises(AdapterConfigError) as err:
        async with open_desk(make_config(tmp_path, cads=bad), alert=lambda a: None,
                             cad_up=Cads()):
            pass
    text = str(err.value)
    assert "forces.kent.cad" in text and "colour: unknown option" in text and "url" in text
    assert "forces.met.cad" in text and "telepathy" in text


def test_csv_sheet_neutralises_formulas_and_keeps_blanks() -> None:
    import time

    from router.handoff.sheets import Sheet, render_csv

    now = time.time()
    sheet = Sheet("h1", incident(1) | {"call_id": None, "summary": "=HYPERLINK(\"x\")",
                                       "location": {"lat": 51.0, "lon": -0.5}}, now, now, "held")
    row = next(csv.DictReader(io.StringIO(render_csv([sheet]))))
    assert row["summary"] == "'=HYPERLINK(\"x\")" and row["lon"] == "-0.5"
    assert row["call_id"] == "" and row["address"] == ""


async def test_one_handoff_a_cad_keeps_refusing_does_not_hold_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A P1 the CAD answers 503 for (it alone) is put aside with its own backoff; every other
    handoff to that CAD is delivered meanwhile, and the P1 too once the CAD takes it."""
    monkeypatch.setattr(delivery, "DEFER_MAX_S", 0.5)  # however slow the machine, back soon
    poison = {"ok": False}
    got: list[str] = []

    async def cad(request: web.Request) -> web.Response:
        body = await request.text()  # whatever the wire shape, it names the incident
        if "KENT-000000" in body and not poison["ok"]:
            return web.json_response({"message": "internal error"}, status=503)
        got.append(body)
        return web.json_response({"reference": "OK"}, status=201)

    app = web.Application()
    app.router.add_post("/incidents", cad)
    async with served(app) as port:
        config = make_config(tmp_path, cads={"essex": {"adapter": "http_json", "options": {
            "url": f"http://127.0.0.1:{port}/incidents", "timeout_s": 2}}})
        async with open_desk(config, alert=lambda a: None, cad_up=Cads()) as desk:
            first = (await desk.submit(inc(0, to="essex", priority="P1")))[0]
            others = [(await desk.submit(inc(n, to="essex", priority="P1")))[0]
                      for n in range(1, 21)]
            for h in others:
                await wait_for(lambda h=h: reaches(desk, h["id"], "delivered"))
            held = await desk.get(first["id"])  # put aside (perhaps being tried again now)
            assert held is not None and held["status"] in ("held", "delivering")
            assert any("cannot take it now" in h.get("detail", "") for h in held["history"])
            poison["ok"] = True
            await wait_for(lambda: reaches(desk, first["id"], "delivered"), 10)
    assert len(got) == 21
    assert metrics.HANDOFF_DEFERRALS.labels("essex")._value.get() >= 1


async def test_an_escalation_whose_sheet_was_lost_in_a_crash_is_completed_on_restart(
        tmp_path: Path) -> None:
    """Killed between recording `escalated` and writing the paper sheet and alert: the
    restarted desk finds the escalation on record without its sheet, and does the rest."""
    cads = Cads()
    cads.up["tvp"] = False
    alerts: list[dict[str, Any]] = []
    config = make_config(tmp_path, deadlines_s={"P1": 0.2, "P2": 30, "P3": 60, "P4": 60})
    async with open_desk(config, alert=alerts.append, cad_up=cads) as desk:
        urgent, _ = await desk.submit(inc(1, to="tvp", priority="P1"))
        await wait_for(lambda: len(alerts) == 1)
    sheet = Path(alerts[0]["sheet"])
    for lost in (sheet, Path(alerts[0]["csv"])):  # as if the process had died before them
        await asyncio.to_thread(lost.unlink)
    replayed: list[dict[str, Any]] = []
    async with open_desk(config, alert=replayed.append, cad_up=cads) as desk:
        await wait_for(lambda: len(replayed) == 1)
        assert await status_of(desk, urgent["id"]) == "escalated"
    assert replayed[0]["handoff_id"] == urgent["id"] and await asyncio.to_thread(sheet.exists)
    async with open_desk(config, alert=replayed.append, cad_up=cads):
        await asyncio.sleep(0.3)  # the sheet is there now: no second alert
    assert len(replayed) == 1
