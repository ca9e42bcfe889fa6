"""A config reload reaches the handoff desk while handoffs are in flight: deadlines, concurrency,
adapters and the set of forces change without losing or repeating a delivery; what only a
restart can change is named, and an adapter that cannot be built refuses the whole reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from handoff_support import (
    Cads,
    RecordingAdapter,
    config_data,
    inc,
    make_config,
    reaches,
    recording,
    wait_for,
)
from service_support import environ, running_service
from service_support import make_config as service_config

from adapters import base, sim
from adapters.base import AdapterConfigError
from adapters.sim import sim_cad
from router.config import RouterConfig, load_config
from router.handoff.desk import open_desk
from router.handoff.incident import UnknownDestination
from router.http import app as service_module


@pytest.fixture(autouse=True)
def recording_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    sim.reset()
    RecordingAdapter.made.clear()
    monkeypatch.setattr(base, "BUILTIN", {**base.BUILTIN,
                                          "recording": "handoff_support:RecordingAdapter"})


def without(tmp: Path, force: str, **kw: Any) -> RouterConfig:
    raw = config_data(tmp, **kw)
    del raw["forces"][force]
    return RouterConfig.model_validate(raw)


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


async def test_reloaded_deadlines_escalate_unfinished_and_new_handoffs(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["tvp"] = False
    alerts: list[dict[str, Any]] = []
    async with open_desk(make_config(tmp_path), alert=alerts.append, cad_up=cads) as desk:
        waiting, _ = await desk.submit(inc(1, to="tvp", priority="P2"))  # 300 s to go
        desk.reconfigure(make_config(tmp_path, spool_dir=str(tmp_path / "sheets"),
                                     deadlines_s={"P1": 60, "P2": 0.2}))
        later, _ = await desk.submit(inc(2, to="tvp", priority="P2"))
        await wait_for(lambda: len(alerts) == 2, within_s=3)
        assert await reaches(desk, waiting["id"], "escalated")
    assert [a["handoff_id"] for a in alerts] == [waiting["id"], later["id"]]
    assert {a["deadline_s"] for a in alerts} == {0.2}
    assert all(Path(a["sheet"]).is_relative_to(tmp_path / "sheets") for a in alerts)


async def test_a_changed_adapter_takes_the_next_delivery_and_the_old_closes_after(
        tmp_path: Path) -> None:
    cads = {"met": recording("old", latency_s=0.3), "kent": recording("kent")}
    async with open_desk(make_config(tmp_path, cads=cads), alert=lambda a: None,
                         cad_up=Cads()) as desk:
        first, _ = await desk.submit(inc(1))
        [old] = RecordingAdapter.of("met")
        await wait_for(lambda: old.in_flight == 1)
        desk.reconfigure(make_config(tmp_path, cads={**cads, "met": recording("new")}))
        second, _ = await desk.submit(inc(2))
        await wait_for(lambda: reaches(desk, second["id"], "delivered"))
        assert not old.closed, "closed under a delivery still in flight"
        await wait_for(lambda: reaches(desk, first["id"], "delivered"))
        await wait_for(lambda: old.closed)
        [kent] = RecordingAdapter.of("kent")
        assert not kent.closed, "an unchanged force keeps its adapter"
    [_, new] = RecordingAdapter.of("met")
    assert (old.delivered, new.delivered) == ([first["id"]], [second["id"]])
    assert not old.closed_while_busy and not old.used_after_close
    assert new.closed and kent.closed  # the desk closes what reloads built, at the end


async def test_an_added_force_gets_a_destination_and_deliveries(tmp_path: Path) -> None:
    async with open_desk(without(tmp_path, "city"), alert=lambda a: None,
                         cad_up=Cads()) as desk:
        with pytest.raises(UnknownDestination):
            await desk.submit(inc(1, to="city"))
        desk.reconfigure(make_config(tmp_path))
        handoff, _ = await desk.submit(inc(1, to="city"))
        await wait_for(lambda: reaches(desk, handoff["id"], "delivered"))
    assert handoff["id"] in sim_cad("city").received


async def test_a_removed_forces_unfinished_handoff_is_still_delivered(tmp_path: Path) -> None:
    cads = Cads()
    cads.up["herts"] = False
    config = make_config(tmp_path, cads={"herts": recording("herts")})
    async with open_desk(config, alert=lambda a: None, cad_up=cads) as desk:
        held, _ = await desk.submit(inc(1, to="herts"))
        cads.up["herts"] = True  # the watcher forgets a removed force: unknown reads as up
        desk.reconfigure(without(tmp_path, "herts"))
        with pytest.raises(UnknownDestination):
            await desk.submit(inc(2, to="herts"))
        await wait_for(lambda: reaches(desk, held["id"], "delivered"))
        await wait_for(lambda: "herts" not in desk.backlog())
        [adapter] = RecordingAdapter.of("herts")
        await wait_for(lambda: adapter.closed)
    assert adapter.delivered == [held["id"]]


async def test_an_adapter_that_cannot_be_built_refuses_the_whole_reload(tmp_path: Path) -> None:
    cads = {"met": recording("old")}
    async with open_desk(make_config(tmp_path, cads=cads), alert=lambda a: None,
                         cad_up=Cads()) as desk:
        settings = desk.settings
        bad = make_config(tmp_path, max_concurrency=1, cads={
            "met": recording("new"), "kent": {"adapter": "sim", "options": {"latency_s": -1}}})
        with pytest.raises(AdapterConfigError, match=r"forces\.kent\.cad"):
            desk.reconfigure(bad)
        assert desk.settings is settings
        handoff, _ = await desk.submit(inc(1))
        await wait_for(lambda: reaches(desk, handoff["id"], "delivered"))
        found = await desk.get(handoff["id"])
    assert found is not None and found["history"][-1]["detail"].endswith(" as old")


async def test_a_lower_max_concurrency_holds_from_the_reload_on(tmp_path: Path) -> None:
    cads = {"sussex": {"adapter": "sim", "options": {"latency_s": 0.05}}}
    async with open_desk(make_config(tmp_path, cads=cads, max_concurrency=6),
                         alert=lambda a: None, cad_up=Cads()) as desk:
        cad = sim_cad("sussex")
        ids = [(await desk.submit(inc(n, to="sussex")))[0]["id"] for n in range(30)]
        await wait_for(lambda: cad.in_flight > 2)
        desk.reconfigure(make_config(tmp_path, cads=cads, max_concurrency=2))
        await wait_for(lambda: cad.in_flight <= 2)
        cad.max_in_flight = cad.in_flight  # those started before the reload have finished
        await wait_for(lambda: desk.backlog()["sussex"] == 0)
    assert cad.max_in_flight == 2
    assert sorted(cad.received) == sorted(ids) and cad.attempts == 30  # none lost, none twice


# ---- through the running service's reload -------------------------------------------------


async def test_reload_names_what_waits_for_a_restart_and_applies_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = service_config(tmp_path)
    async with running_service(path) as api:
        def change(raw: dict[str, Any]) -> None:
            raw["handoff"].update(store=f"sqlite:///{tmp_path / 'elsewhere.db'}",
                                  deadlines_s={"P1": 30, "P2": 300, "P3": 1800, "P4": 7200})
            raw["service"]["listen"] = {"host": "127.0.0.1", "port": 8099}

        edit(path, change)
        with caplog.at_level(logging.WARNING, logger="router.runtime"):
            status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert status == 200 and body["status"] == "reloaded"
        assert body["restart_required"] == ["service.listen.port", "handoff.store"]
        desk = api.service.runtime.desk
        assert desk is not None and desk.settings.deadlines_s["P1"] == 30
        status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert body["restart_required"] == ["service.listen.port", "handoff.store"], \
            "still the old store: it is compared with what the service started with"
    assert "only change on a restart: service.listen.port, handoff.store" in caplog.text


async def test_reload_with_an_adapter_that_cannot_be_built_keeps_the_old_config(
        tmp_path: Path) -> None:
    path = service_config(tmp_path)
    edit(path, lambda raw: raw["forces"]["met"].update(cad=recording("old")))
    async with running_service(path) as api:
        runtime = api.service.runtime
        config, desk = runtime.config, runtime.desk
        assert desk is not None
        settings = desk.settings

        def change(raw: dict[str, Any]) -> None:
            raw["forces"]["met"]["cad"] = recording("new", buildable=False)
            raw["handoff"]["max_concurrency"] = 1

        edit(path, change)
        status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert status == 422 and body["error"] == "config_invalid"
        assert any("forces.met.cad" in i and "new cannot be built" in i for i in body["issues"])
        assert runtime.config is config and desk.settings is settings
    assert [a.label for a in RecordingAdapter.of("met")] == ["old"]


async def test_a_reload_while_the_desk_opens_reaches_it_once_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP can land while the store opens and handoffs resume, before the desk is
    reachable: the desk must still end up on the reloaded config."""
    path = service_config(tmp_path)
    service = service_module.RouterApp(load_config(path), path, environ())
    real_open = service_module.open_desk

    @contextlib.asynccontextmanager
    async def open_during_a_reload(config: RouterConfig, **kw: Any) -> Any:
        edit(path, lambda raw: raw["handoff"].update(
            deadlines_s={"P1": 30, "P2": 300, "P3": 1800, "P4": 7200}))
        assert service.runtime.desk is None
        await service.runtime.reload_async(source="SIGHUP")  # what SIGHUP does
        async with real_open(config, **kw) as desk:
            yield desk

    monkeypatch.setattr(service_module, "open_desk", open_during_a_reload)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.run("127.0.0.1", 0, stop, ready.set_result))
    try:
        await asyncio.wait_for(ready, 10)
        desk = service.runtime.desk
        assert desk is not None and desk.settings.deadlines_s["P1"] == 30
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
