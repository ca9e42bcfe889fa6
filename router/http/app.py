"""The router application: assembles the parts and runs them, from start to a clean stop.

One asyncio process. Each long-lived part is an aiohttp cleanup context, opened in order as
the app starts and closed in reverse after it stops: the audit log, the MQTT link, the
handoff desk, the health watcher, call expiry, the publisher (MQTT state and routing, alerts)
and the leader's lease that lets it publish; last, the calls in flight shared with other
routers (closed first: its final word goes out while the link is up).
So shutdown stops accepting requests, lets in-flight ones finish, cancels the background
tasks, and only then closes the desk and the audit log that the requests and tasks were
writing to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from adapters.base import AdapterConfigError
from router.config import ConfigError, RouterConfig, load_config
from router.engine.calls import CallDesk
from router.engine.model import Snapshot
from router.handoff.desk import HandoffDesk, open_desk
from router.http import calls, dashboard, events, forces, handoffs, openapi, ops, timeline
from router.http.auth import TOKENS, TokenBook
from router.http.errors import MAX_BODY_BYTES, errors_middleware
from router.http.server import RouterRunner
from router.http.state import RUNTIME
from router.http.telling import Telling
from router.http.tls import listener_context
from router.infra.audit import AuditLog
from router.infra.clock import steady_wall
from router.infra.instance import instance_name
from router.infra.leader import Leadership
from router.infra.memory import memory_for
from router.infra.mqtt_link import MqttLink
from router.infra.supervise import keep_running
from router.runtime import Runtime
from router.watch.exporter import StateMetrics
from router.watch.keeper import Keeper
from router.watch.peers import Peers
from router.watch.publisher import Publisher
from router.watch.watcher import Watcher

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_S = 1.0  # often, so each sweep is small
SHUTDOWN_TIMEOUT_S = 5.0  # for requests in flight, then for each background task to end
DESK_READY_S = 5.0  # at start, for the handoff store to open; then it serves anyway
KEEPER_READY_S = 3.0  # at start, for declarations to be read back; then it serves anyway


def build_app(runtime: Runtime, tokens: TokenBook) -> web.Application:
    """The routes and the state the handlers read; the parts are added by RouterApp."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[RUNTIME] = runtime
    app[TOKENS] = tokens
    app[handoffs.HANDOFFS] = runtime  # its desk is set once open, after the app is frozen
    for module in (calls, forces, ops, handoffs, openapi, dashboard, events, timeline):
        module.add_routes(app)
    return app


class RouterApp:
    """Owns every long-lived part; `run()` serves until `stop` is set."""

    def __init__(self, config: RouterConfig, config_path: Path | None = None,
                 environ: Mapping[str, str] = os.environ):
        self.config = config
        self.environ = dict(environ)
        self.mqtt = MqttLink(config.mqtt, environ=self.environ) if config.mqtt.enabled else None
        self.audit = AuditLog(Path(config.service.audit_log))
        self.watcher = Watcher(config, mqtt=self.mqtt, audit=self.audit)
        self.keeper = Keeper(self.watcher, memory_for(config.handoff.store))
        self.calls = CallDesk(config)
        self.instance = instance_name(self.environ)
        self.leadership = Leadership(config.handoff.store, self.instance)
        # quiet until the lease says it leads (at once, for a router alone)
        self.publisher = Publisher(config, watcher=self.watcher, calls=self.calls, mqtt=self.mqtt,
                                   leading=False)
        self.leadership.on_change(self.publisher.lead)
        self.state_metrics = StateMetrics(self.watcher, self.calls)
        self.tokens = TokenBook(config.service.tokens, self.environ)
        self.runtime = Runtime(config, config_path, self.calls, self.watcher, self.tokens,
                               self.environ, mqtt=self.mqtt, audit=self.audit,
                               publisher=self.publisher, keeper=self.keeper,
                               instance=self.instance, leadership=self.leadership)
        self.app = build_app(self.runtime, self.tokens)
        self.app.cleanup_ctx.extend([  # opened in this order, closed in reverse
            self._audit_log, self._mqtt_link, self._keeper, self._handoff_desk, self._watcher,
            self._call_expiry, self._publisher, self._leader, self._live_events])
        # other routers' calls in flight, counted in; subscribed before the link connects
        self.peers = Peers(self.calls, self.mqtt, self.instance) if self.mqtt is not None \
            else None
        self.app.cleanup_ctx.append(self._peer_counts)
        self.events = self.app[events.EVENTS]
        # dashboards' streams end first, so the shutdown timeout never waits on them
        self.app.on_shutdown.append(self.events.on_shutdown)
        self.port: int | None = None
        self._failed: BaseException | None = None  # the first background task that crashed
        self._halt = asyncio.Event()  # set when one has: the service stops, and run() raises
        self._desk_ready = asyncio.Event()  # the handoff desk opened once
        self.telling = Telling(audit=self.audit, mqtt=self.mqtt, alerter=self.publisher.alerter,
                               on_alert=self.events.on_alert, on_step=self.events.on_handoff)
        # in-process listeners to every handoff step a sender is told of (the demo)
        self.status_listeners = self.telling.status_listeners

    async def run(self, host: str, port: int, stop: asyncio.Event,
                  started: Callable[[int], Awaitable[None] | None] | None = None) -> None:
        # no per-request access log: a synchronous write per call is too dear at 999 rates;
        # overflow_http_requests_total counts requests instead
        runner = RouterRunner(self.app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                              access_log=None,
                              header_timeout_s=self.config.service.listen.header_timeout_s)
        try:
            await runner.setup()  # opens the parts, in order
            tls = listener_context(self.runtime)  # None: plain HTTP
            site = web.TCPSite(runner, host, port, ssl_context=tls)
            await site.start()
            self.port = _bound_port(site)
            log.info("overflow-router serving on %s://%s:%d/", "https" if tls else "http",
                     host, self.port)
            if started is not None:
                result = started(self.port)
                if asyncio.iscoroutine(result):
                    await result
            await _first_set(stop, self._halt)
            log.info("stopping: finishing requests in flight")
        finally:
            # stop accepting, finish in-flight requests, then close the parts in reverse
            await runner.cleanup()
        if self._failed is not None:
            raise self._failed

    # ---- the parts, as cleanup contexts: set up before `yield`, torn down after ----

    async def _audit_log(self, app: web.Application) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # last: everything before it may still audit. The final fsync blocks: off the loop
            await asyncio.to_thread(self.audit.close)

    async def _mqtt_link(self, app: web.Application) -> AsyncIterator[None]:
        if self.mqtt is None:
            yield
            return
        async with self._background(self.mqtt.run, "mqtt"):
            yield

    async def _handoff_desk(self, app: web.Application) -> AsyncIterator[None]:
        """The desk, opened (its store, and resuming unfinished handoffs) and reopened after
        any failure in the background: until it is open, handoffs are refused with 503 and
        `Retry-After`, and routing goes on regardless."""
        async with self._background(self._desk_open, "handoff-desk"):
            with contextlib.suppress(TimeoutError):  # serve without it if its store is away
                await asyncio.wait_for(self._desk_ready.wait(), DESK_READY_S)
            yield

    async def _desk_open(self) -> None:
        """One life of the desk, reachable to handlers and reloads through runtime.desk; it
        returns only by failing (the supervisor opens it again)."""
        opened_with = self.runtime.config
        # deadlines as differences of stored epoch times: on a clock an NTP step cannot move
        async with open_desk(opened_with, alert=self.telling.alert, notify=self.telling.tell_sender,
                             cad_up=lambda force: self.watcher.snapshot.get(force).cad_up,
                             clock=steady_wall, owner=self.instance) as desk:
            self.runtime.desk = desk
            self._desk_ready.set()
            if self.runtime.config is not opened_with:  # reloaded while the desk opened
                self._catch_up(desk)
            unsubscribe = self.watcher.add_listener(self._cad_watch(desk))
            try:
                await asyncio.Event().wait()  # until cancelled, or the desk's tasks fail
            finally:
                unsubscribe()
                self.runtime.desk = None

    async def _keeper(self, app: web.Application) -> AsyncIterator[None]:
        """Declarations and last known states: read back before the watcher starts deciding,
        written as they change (a store that is away is retried; routing never waits)."""
        try:
            async with self._background(self.keeper.run, "keeper"):
                # the first calls must see what was declared: wait for it, a little
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.keeper.ready.wait(), KEEPER_READY_S)
                yield
        finally:
            await self.keeper.close()

    async def _watcher(self, app: web.Application) -> AsyncIterator[None]:
        async with self._background(self.watcher.run, "watcher"):
            yield

    async def _call_expiry(self, app: web.Application) -> AsyncIterator[None]:
        async with self._background(self._expire_calls, "expiry"):
            yield

    async def _publisher(self, app: web.Application) -> AsyncIterator[None]:
        """Retained states and routing on MQTT, and diversion alerts to partners."""
        try:
            async with aiohttp.ClientSession() as session, \
                    self._background(lambda: self.publisher.run(session), "publisher"):
                yield
        finally:
            self.publisher.close()

    async def _leader(self, app: web.Application) -> AsyncIterator[None]:
        """The leader's lease: whether this router publishes (router/infra/leader.py)."""
        async with self._background(self.leadership.run, "leader"):
            yield

    async def _peer_counts(self, app: web.Application) -> AsyncIterator[None]:
        """Mutual-aid caps across routers: this one's calls in flight told, the others' counted
        in (router/watch/peers.py)."""
        if self.peers is None:
            yield
            return
        try:
            async with self._background(self.peers.run, "peers"):
                yield
        finally:
            await self.peers.close()

    async def _live_events(self, app: web.Application) -> AsyncIterator[None]:
        """Dashboards' live updates (router.http.events): every new snapshot marks the board
        changed; the hub pushes it."""
        unsubscribe = self.watcher.add_listener(self.events.on_snapshot)
        try:
            async with self._background(self.events.run, "dashboard-events"):
                yield
        finally:
            unsubscribe()

    @contextlib.asynccontextmanager
    async def _background(self, start: Callable[[], Coroutine[Any, Any, None]],
                          name: str) -> AsyncIterator[None]:
        """Run `start()` as a task while the context is open, supervised (restarted if it
        fails: router.infra.supervise); cancel it and wait for it after."""
        task = asyncio.create_task(keep_running(start, name), name=name)
        task.add_done_callback(self._task_done)
        try:
            yield
        finally:
            task.cancel()
            # not `await task`: that would swallow a cancellation of this cleanup itself
            await asyncio.wait([task], timeout=SHUTDOWN_TIMEOUT_S)
            if not task.done():
                log.error("background task %s did not end within %.0f s of its cancellation",
                          name, SHUTDOWN_TIMEOUT_S)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("background task %s failed; stopping", task.get_name(),
                  exc_info=task.exception())
        if self._failed is None:
            self._failed = task.exception()
        self._halt.set()

    # ---- what the parts do ----

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


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    async with asyncio.TaskGroup() as tg:
        waits = [tg.create_task(event.wait()) for event in events]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound port
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def install_signals(stop: asyncio.Event, reload: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)


def _reload_on_hup(runtime: Runtime) -> Callable[[], asyncio.Task[None]]:
    """SIGHUP starts a reload as a task: the file is parsed off the loop (Runtime.reload_async)
    and routing goes on meanwhile."""
    running: set[asyncio.Task[None]] = set()  # held until done, so none is collected early

    async def reload() -> None:
        try:
            await runtime.reload_async(source="SIGHUP")
        except ConfigError as exc:
            log.error("SIGHUP reload refused; keeping the running config:\n%s", exc)

    def on_hup() -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(reload(), name="SIGHUP reload")
        running.add(task)
        task.add_done_callback(running.discard)
        return task

    return on_hup


async def serve(config_path: Path, host: str | None, port: int | None) -> None:
    config = load_config(config_path)
    router_app = RouterApp(config, config_path)
    stop = asyncio.Event()
    install_signals(stop, _reload_on_hup(router_app.runtime))
    listen = config.service.listen
    await router_app.run(host or listen.host, listen.port if port is None else port, stop)
