"""The router service: assembles the parts and runs them, from start to a clean stop.

One asyncio process: the aiohttp server, the health watcher, the MQTT link, the handoff desk and
a few housekeeping loops, all under one TaskGroup. Shutdown stops accepting requests first,
lets in-flight ones finish, then cancels the background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from adapters.base import AdapterConfigError
from router.config import ConfigError, RouterConfig, load_config
from router.engine.calls import CallDesk
from router.engine.model import Snapshot
from router.handoff.desk import HandoffDesk, open_desk
from router.http import api
from router.http import handoffs as api_handoffs
from router.http.auth import TOKENS, TokenBook
from router.http.errors import MAX_BODY_BYTES
from router.infra.audit import AuditLog
from router.infra.mqtt_link import MqttLink
from router.runtime import RUNTIME, Runtime
from router.watch.watcher import Watcher

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
EXPIRY_INTERVAL_S = 1.0  # often, so each sweep is small
ROUTING_PUBLISH_INTERVAL_S = 1.0


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "dashboard.html")


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[api.errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[RUNTIME] = runtime
    app[TOKENS] = runtime.tokens
    api.add_routes(app)
    api_handoffs.add_routes(app)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/", dashboard)
    return app


async def openapi_handler(request: web.Request) -> web.Response:
    from router.http.openapi import spec  # built on first use: it walks every model's schema

    return web.json_response(spec())


class Service:
    """Owns every long-lived part; `run()` serves until `stop` is set."""

    def __init__(self, config: RouterConfig, config_path: Path | None = None,
                 environ: Mapping[str, str] = os.environ):
        self.config = config
        self.environ = dict(environ)
        self.mqtt = MqttLink(config.mqtt, environ=self.environ) if config.mqtt.enabled else None
        self.audit = AuditLog(Path(config.service.audit_log))
        self.watcher = Watcher(config, mqtt=self.mqtt, audit=self.audit)
        self.calls = CallDesk(config)
        self.runtime = Runtime(config, config_path, self.calls, self.watcher,
                               TokenBook(config.service.tokens, self.environ), self.environ,
                               mqtt=self.mqtt, audit=self.audit)
        self.app = build_app(self.runtime)
        self.port: int | None = None
        self._published: dict[str, Any] = {}

    def publish_alert(self, alert: dict[str, Any]) -> None:
        if self.mqtt is not None:
            self.mqtt.publish("alerts", alert)

    async def run(self, host: str, port: int, stop: asyncio.Event,
                  started: Callable[[int], Awaitable[None] | None] | None = None) -> None:
        # no per-request access log: a synchronous write per call is too dear at 999 rates;
        # overflow_http_requests_total counts requests instead
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=5.0,
                               access_log=None)
        try:
            async with contextlib.AsyncExitStack() as stack:
                opened_with = self.runtime.config
                desk = await stack.enter_async_context(open_desk(
                    opened_with, alert=self.publish_alert,
                    cad_up=lambda force: self.watcher.snapshot.get(force).cad_up))
                self.app[api_handoffs.HANDOFFS] = self.runtime.desk = desk  # reloads reach it
                stack.callback(setattr, self.runtime, "desk", None)
                if self.runtime.config is not opened_with:  # reloaded while the desk opened
                    self._catch_up(desk)
                self.watcher.add_listener(self._cad_watch(desk))
                await runner.setup()  # freezes the app: its state is complete by now
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self.watcher.run(), name="watcher"),
                             tg.create_task(self._expire_calls(), name="expiry"),
                             tg.create_task(self._publish_routing(), name="routing-publisher")]
                    if self.mqtt is not None:
                        tasks.append(tg.create_task(self.mqtt.run(), name="mqtt"))
                    site = web.TCPSite(runner, host, port)
                    await site.start()
                    self.port = _bound_port(site)
                    log.info("overflow-router serving on http://%s:%d/", host, self.port)
                    if started is not None:
                        result = started(self.port)
                        if asyncio.iscoroutine(result):
                            await result
                    await stop.wait()
                    log.info("stopping: finishing requests in flight")
                    await runner.cleanup()  # stop accepting, finish in-flight requests
                    for task in tasks:
                        task.cancel()
        finally:
            await runner.cleanup()
            self.audit.close()

    def _catch_up(self, desk: HandoffDesk) -> None:
        try:
            desk.reconfigure(self.runtime.config)
        except AdapterConfigError as exc:  # the rest of that reload stands; say what did not
            log.error("a reload during start-up changed CAD adapters that cannot be built; "
                      "handoffs keep the adapters the router started with:\n%s", exc)

    def _cad_watch(self, desk: HandoffDesk) -> Callable[[Snapshot], None]:
        """Tell the handoff desk when a CAD comes back, so its held backlog drains."""
        last: dict[str, bool] = {}

        def on_change(snapshot: Snapshot) -> None:
            for force in self.runtime.config.forces:
                up = snapshot.get(force).cad_up
                if last.get(force) != up:
                    last[force] = up
                    desk.cad_state_changed(force, up)

        return on_change

    async def _expire_calls(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            expired = batch = self.calls.expire()
            while batch:  # a backlog is freed in small batches, letting requests in between
                await asyncio.sleep(0)
                batch = self.calls.expire()
                expired += batch
            if expired:
                log.info("freed %d calls whose end was never reported", expired)

    async def _publish_routing(self) -> None:
        """Publish each origin's shares, retained, whenever they change, and all of them again
        after each new connection (the broker may be new, or may have lost them)."""
        connections = 0
        while True:
            await asyncio.sleep(ROUTING_PUBLISH_INTERVAL_S)
            if self.mqtt is None:
                continue
            if self.mqtt.connections != connections:
                connections = self.mqtt.connections
                self._published.clear()
            table = self.calls.routing_table(self.watcher.snapshot)
            for origin, services in table.items():
                for service, shares in services.items():
                    key = f"routing/{origin}/{service}"
                    if self._published.get(key) != shares:
                        self._published[key] = shares
                        self.mqtt.publish(key, {"origin": origin, "service": service,
                                                "destinations": shares}, retain=True)


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound port
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def install_signals(stop: asyncio.Event, reload: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)


def _reload_on_hup(runtime: Runtime) -> Callable[[], None]:
    def reload() -> None:
        try:
            runtime.reload()
        except ConfigError as exc:
            log.error("SIGHUP reload refused; keeping the running config:\n%s", exc)

    return reload


async def serve(config_path: Path, host: str | None, port: int | None) -> None:
    config = load_config(config_path)
    service = Service(config, config_path)
    stop = asyncio.Event()
    install_signals(stop, _reload_on_hup(service.runtime))
    listen = config.service.listen
    await service.run(host or listen.host, listen.port if port is None else port, stop)
