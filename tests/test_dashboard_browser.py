"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright), against
the real demo: its service, simulated centres, callers and partners, run in-process so the test
can inject the demo's own failures when it needs them (the story's script is off).

Tests run in order against one demo: the board, a viewer's page, a declaration made in the page,
a CAD down, the Met's outage with an escalated handoff (screenshots), the partner view, and last
the router stopping under an open page. Screenshots go to a temporary folder, or to docs/ with
OVERFLOW_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, need

from router.tools.demo import Options, run_demo
from router.tools.story import Demo, Pace

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1366, "height": 768}
FAST = Pace(scripted=False, mean_handling_s=3.0, ramp_step_s=1.0,
            deadlines_s={"P1": 6, "P2": 300, "P3": 1800, "P4": 7200})

pytestmark = pytest.mark.timeout(120)


@dataclass
class Running:
    demo: Demo
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread
    lines: list[str] = field(default_factory=list)

    def url(self, role: str) -> str:
        return f"{self.demo.base}/#token={self.demo.tokens[role]}"

    def call(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the demo's loop (its centres are the loop's to change)."""
        self.loop.call_soon_threadsafe(fn, *args)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("OVERFLOW_UPDATE_SCREENSHOTS") == "1":
        return ROOT / "docs"
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    ready = threading.Event()
    found: dict[str, Any] = {}
    lines: list[str] = []

    def main() -> None:
        async def go() -> None:
            stop = asyncio.Event()
            found.update(loop=asyncio.get_running_loop(), stop=stop)

            def started(demo: Demo) -> None:
                found["demo"] = demo
                ready.set()

            await run_demo(options=Options(port=0, pace=FAST, signals=False, stop=stop,
                                           ready=started, say=lines.append))
        asyncio.run(go())

    thread = threading.Thread(target=main, name="demo", daemon=True)
    thread.start()
    assert ready.wait(30), "the demo did not start within 30 s"
    run = Running(found["demo"], found["loop"], found["stop"], thread, lines)
    yield run
    if thread.is_alive():
        run.loop.call_soon_threadsafe(run.stop.set)
        thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need(importlib.util.find_spec("playwright") is not None, "Playwright for Python",
         "the dev extras: pip install -e '.[dev]' (playwright)")
    need(os.path.exists(CHROMIUM), "Chromium", "chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page_for(browser: Any, running: Running) -> Iterator[Any]:
    contexts = []

    def open_page(role: str) -> Any:
        context = browser.new_context(viewport=VIEWPORT, timezone_id="Europe/London")
        contexts.append(context)
        page = context.new_page()
        page.goto(running.url(role))
        return page

    yield open_page
    for context in contexts:
        context.close()


def card(page: Any, force: str) -> Any:
    return page.locator(f'article.card[data-force="{force}"]')


def headline(page: Any, force: str) -> str:
    return str(card(page, force).locator('[data-role="headline"]').inner_text())


def wait_for(check: Any, within_s: float, what: str, step_s: float = 0.05) -> float:
    """Poll `check` until true; how long it took. Fails naming `what`."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if check():
            return time.monotonic() - start
        time.sleep(step_s)
    raise AssertionError(f"{what}: not within {within_s:g} s")


def test_every_force_renders_with_its_state_in_words(page_for: Any, running: Running) -> None:
    page = page_for("manager")
    forces = list(running.demo.config.forces)
    page.wait_for_function(
        f"document.querySelectorAll('article.card').length === {len(forces)}", timeout=10_000)
    wait_for(lambda: all("NORMAL" in headline(page, f) for f in forces), 10, "every centre NORMAL")
    for force in forces:
        text = card(page, force).inner_text()
        assert "phones" in text and "CAD" in text and "queue" in text and "in flight" in text
    routing = page.locator("#routing tr")
    assert routing.count() == len(forces)
    assert page.locator("#routing").is_visible()  # beside the board, not below the fold
    box = page.locator("#routing").bounding_box()
    assert box is not None and box["y"] < VIEWPORT["height"]
    assert "home 100%" in page.locator('#routing tr[data-origin="kent"]').inner_text()
    # colours come from the config's order: the same on every load
    colour = "getComputedStyle(document.querySelector('[data-force=kent]')).borderLeftColor"
    before = page.evaluate(colour)
    page.reload()
    page.wait_for_selector('article.card[data-force="kent"]')
    assert page.evaluate(colour) == before


def test_a_viewer_has_no_controls(page_for: Any) -> None:
    page = page_for("viewer")
    page.wait_for_selector('article.card[data-force="met"]')
    assert page.locator("[data-action]").count() == 0
    assert "viewer" in page.locator("#who").inner_text()
    assert page.locator("#timeline li").count() >= 0  # the timeline is a viewer's too


def test_a_declaration_in_the_page_changes_the_board_and_routing_within_a_second(
        page_for: Any, running: Running) -> None:
    page = page_for("manager")
    page.wait_for_selector('article.card[data-force="tvp"] [data-action="declare"]')
    wait_for(lambda: "NORMAL" in headline(page, "tvp"), 10, "tvp NORMAL")
    card(page, "tvp").locator('[data-action="declare"]').click()
    page.select_option("#declState", "draining")
    page.fill("#declReason", "browser test: evacuating the control room")
    page.select_option("#declExpiry", "900")
    page.fill("#declOperator", "Insp. Test")
    page.click("#declReview")
    assert "DRAINING" in page.locator("#declareConfirm").inner_text()  # asked before applying
    page.click("#declApply")
    took = wait_for(lambda: "DRAINING" in headline(page, "tvp")
                    and "home" not in page.locator('#routing tr[data-origin="tvp"]'
                                                   ' td[data-service="999"]').inner_text(),
                    1.0, "tvp DRAINING on the board and its 999s off home")
    print(f"declaration → board and routing changed in {took * 1000:.0f} ms")
    assert "Insp. Test" in card(page, "tvp").locator('[data-role="declaration"]').inner_text()
    # cleared only after confirming, naming the person
    card(page, "tvp").locator('[data-action="clear"]').click()
    page.fill("#declOperator", "Insp. Test")
    page.click("#declReview")
    assert "Clear" in page.locator("#declareConfirm").inner_text()
    page.click("#declApply")
    wait_for(lambda: "DRAINING" not in headline(page, "tvp"), 2, "the declaration cleared")
    page.wait_for_selector('#timeline li[data-kind="declaration"]', timeout=5_000)
    assert "Insp. Test" in page.locator("#timeline").inner_text()


def test_a_cad_down_centre_reads_as_diverting(page_for: Any, running: Running) -> None:
    """The Met's `on_cad_down: overflow`: phones up, CAD down, every call to partners."""
    page = page_for("viewer")
    page.wait_for_selector('article.card[data-force="met"]')
    running.call(lambda: running.demo.fail("met", phones=False, cad=True))
    try:
        wait_for(lambda: "DIVERTING" in headline(page, "met")
                 and "CAD" in headline(page, "met"), 5, "the Met reads diverting — CAD down")
        assert card(page, "met").get_attribute("data-diverting") == "true"
        assert "NORMAL" not in headline(page, "met")
    finally:
        running.call(running.demo.restore_cad, "met")
    wait_for(lambda: "DIVERTING" not in headline(page, "met"), 5, "the Met back")


def test_an_outage_and_an_escalated_handoff_appear_without_reload(
        page_for: Any, running: Running, shots: Path, tmp_path: Path) -> None:
    page = page_for("manager")
    partner = page_for("partner:kent")
    page.wait_for_selector('article.card[data-force="met"]')
    wait_for(lambda: "NORMAL" in headline(page, "met"), 10, "the Met NORMAL")
    running.call(running.demo.fail, "met")
    wait_for(lambda: "DOWN" in headline(page, "met"), 5, "the Met DOWN on the open page")
    wait_for(lambda: "kent" in page.locator('#routing tr[data-origin="met"]').inner_text(), 5,
             "the Met's calls routed to Kent")
    # Kent's partner view: the Met's calls coming to Kent
    partner.wait_for_selector("#incoming tr td", timeout=5_000)
    wait_for(lambda: "met" in partner.locator("#incoming").inner_text(), 5,
             "the Met's calls in Kent's partner view")
    # partners hand incidents back; held while the Met's CAD is down; P1s escalate after 6 s
    page.wait_for_selector('#handoffs tr[data-status="escalated"]', timeout=30_000)
    page.wait_for_selector('#alerts li[data-kind="handoff_escalated"]', timeout=5_000)
    page.screenshot(path=str(shots / "dashboard-outage.png"), full_page=True)
    partner.wait_for_selector("#handoffsFrom tr[data-handoff]", timeout=10_000)
    partner.screenshot(path=str(tmp_path / "partner-view.png"))
    # the escalated handoff: its history, its sheet, then handled on paper
    page.locator('#handoffs tr[data-status="escalated"] button').first.click()
    page.wait_for_selector("#handoffDlg[open]", timeout=5_000)
    assert "escalated" in page.locator("#handoffBody").inner_text()
    page.click("#sheetBtn")
    frame = page.frame_locator("#sheetFrame")
    assert "ESCALATED INCIDENT HANDOFF" in frame.locator("h1").inner_text()
    page.click("#paperBtn")
    page.fill("#paperReason", "phoned through to the Met's duty officer")
    page.fill("#paperOperator", "Sgt. Paper")
    page.click("#paperApply")
    assert "Sgt. Paper" in page.locator("#paperConfirm").inner_text()  # confirm first
    page.click("#paperApply")
    page.wait_for_selector("#handoffDlg", state="hidden", timeout=5_000)
    page.wait_for_selector('#timeline li[data-kind="paper"]', timeout=5_000)
    # the phones return first: with its CAD still down the Met reads as diverting
    running.call(running.demo.restore_phones, "met")
    wait_for(lambda: "CAD" in headline(page, "met") and "DIVERTING" in headline(page, "met"),
             8, "the Met diverting — CAD down")
    running.call(running.demo.restore_cad, "met")
    wait_for(lambda: headline(page, "met").strip().endswith("NORMAL"), 15, "the Met NORMAL")


def test_the_stale_banner_appears_when_the_router_stops(page_for: Any,
                                                        running: Running) -> None:
    page = page_for("viewer")
    page.wait_for_selector('article.card[data-force="met"]')
    assert page.locator("#staleBanner").count() == 0
    running.loop.call_soon_threadsafe(running.stop.set)
    running.thread.join(30)
    assert not running.thread.is_alive(), "the demo did not stop"
    page.wait_for_selector("#staleBanner", timeout=10_000)
    assert "NOT LIVE" in page.locator("#staleBanner").inner_text()
    assert "SUMMARY" in "\n".join(running.lines)
