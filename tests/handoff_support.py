"""Helpers shared by the handoff tests: a small config, incidents, waiting on the desk, and an
adapter that records what it did."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml
from aiohttp import web

from adapters.base import Ack, AdapterConfigError, AdapterContext, AdapterOptions, Delivery
from router.config import RouterConfig
from router.handoff.desk import HandoffDesk
from router.handoff.incident import Incident
from router.http.auth import TOKENS, TokenBook
from router.http.errors import errors_middleware
from router.http.handoffs import HANDOFFS, OpenDesk, add_routes

ROOT = Path(__file__).resolve().parent.parent


@cache
def _bundled() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    return data


def config_data(tmp: Path, store: str | None = None, cads: dict[str, dict[str, Any]] | None = None,
                **handoff: Any) -> dict[str, Any]:
    """The bundled eight forces, without probes or telemetry, every CAD simulated unless
    `cads` says otherwise, the store and spool in `tmp`."""
    raw = copy.deepcopy(_bundled())
    for fid, force in raw["forces"].items():
        force["centre"]["probes"] = []
        force["centre"]["telemetry"] = False
        force["cad"] = (cads or {}).get(fid, {"adapter": "sim", "options": {"latency_s": 0}})
    raw["mqtt"] = {"enabled": False}
    raw["service"]["audit_log"] = str(tmp / "audit.jsonl")
    raw["handoff"] = {
        "store": store or f"sqlite:///{tmp / 'handoffs.db'}", "spool_dir": str(tmp / "spool"),
        "max_concurrency": 4,
        "retry": {"attempts": 2, "initial_s": 0.01, "max_s": 0.05, "attempt_timeout_s": 1.0,
                  "hold_probe_s": 0.2},
        **handoff,
    }
    return raw


def make_config(tmp: Path, store: str | None = None, cads: dict[str, dict[str, Any]] | None = None,
                **handoff: Any) -> RouterConfig:
    return RouterConfig.model_validate(config_data(tmp, store, cads, **handoff))


# one opening time per test session: the same incident built twice is the same content
OPENED_AT = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def incident(n: int, frm: str = "kent", to: str = "met", priority: str = "P1",
             **extra: Any) -> dict[str, Any]:
    return {
        "incident_id": f"{frm.upper()}-{n:06d}", "from": frm, "to": to, "priority": priority,
        "service": "999", "call_id": f"call-{n}",
        "opened_at": OPENED_AT,
        "location": {"lat": 51.2, "lon": 0.5, "address": "1 High St, Maidstone"},
        "category": "burglary", "summary": f"incident {n} <script>alert(1)</script>",
        "caller": {"name": "A Caller", "phone": "+44 7700 900123"}, **extra,
    }


def inc(n: int, **kw: Any) -> Incident:
    return Incident.model_validate(incident(n, **kw))


async def wait_for(check: Callable[[], Any], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await _maybe(check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _maybe(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


async def status_of(desk: HandoffDesk, hid: str) -> str:
    found = await desk.get(hid)
    assert found is not None
    return str(found["status"])


async def reaches(desk: HandoffDesk, hid: str, status: str) -> bool:
    return await status_of(desk, hid) == status


class Cads:
    """The watcher's view of each CAD, as the service would pass it."""

    def __init__(self) -> None:
        self.up: dict[str, bool] = {}

    def __call__(self, force: str) -> bool:
        return self.up.get(force, True)


class RecordingOptions(AdapterOptions):
    label: str
    latency_s: float = 0.0
    buildable: bool = True  # False: the constructor refuses, as a plug-in may


class RecordingAdapter:
    """Acknowledges with its label after `latency_s`; every instance is kept in `made`, with
    what it delivered and whether it was closed with a delivery still in flight."""

    Options = RecordingOptions
    made: ClassVar[list[RecordingAdapter]] = []

    def __init__(self, options: RecordingOptions, context: AdapterContext):
        if not options.buildable:
            raise AdapterConfigError(f"adapter 'recording': {options.label} cannot be built")
        self.label, self.latency_s, self.force = options.label, options.latency_s, context.force
        self.delivered: list[str] = []
        self.in_flight = 0
        self.closed = False
        self.used_after_close = False
        self.closed_while_busy = False
        RecordingAdapter.made.append(self)

    async def deliver(self, delivery: Delivery) -> Ack:
        self.used_after_close |= self.closed
        self.in_flight += 1
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        self.delivered.append(delivery.key)
        return Ack(reference=self.label)

    async def aclose(self) -> None:
        self.closed_while_busy |= self.in_flight > 0
        self.closed = True

    @classmethod
    def of(cls, force: str) -> list[RecordingAdapter]:
        return [a for a in cls.made if a.force == force]


def recording(label: str, **options: Any) -> dict[str, Any]:
    """A force's `cad:` block for the recording adapter."""
    return {"adapter": "recording", "options": {"label": label, **options}}


def handoff_app(desk: HandoffDesk, book: TokenBook) -> web.Application:
    """The handoff API alone, on an open desk, with the service's error middleware."""
    app = web.Application(middlewares=[errors_middleware])
    app[TOKENS] = book
    app[HANDOFFS] = OpenDesk(desk)
    add_routes(app)
    return app
