"""The running service's parts, held together so handlers and the lifecycle share one view,
and the reload that swaps a new config into all of them at once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.base import Adapter, AdapterConfigError
from router.config import ConfigError, ConfigIssue, RouterConfig, Token, load_config
from router.engine.calls import CallDesk
from router.handoff.desk import HandoffDesk
from router.infra import metrics
from router.infra.audit import AuditLog
from router.infra.leader import Leadership
from router.infra.mqtt_link import MqttLink
from router.watch.keeper import Keeper
from router.watch.publisher import Publisher
from router.watch.watcher import Watcher

log = logging.getLogger(__name__)

# Read once at start: the listening socket, whether there is an MQTT link at all, and the
# handoff store. (Broker settings and the audit file follow a reload.)
RESTART_ONLY = ("service.listen", "mqtt.enabled", "handoff.store")


@dataclass(frozen=True)
class Reloaded:
    config: RouterConfig
    restart_required: list[str]  # changed settings that wait for a restart, as key paths


class Tokens(Protocol):
    """The HTTP layer's token book (router.http.auth), reread on every reload."""

    def load(self, tokens: tuple[Token, ...], environ: Mapping[str, str]) -> None: ...


class Certificates(Protocol):
    """The listener's TLS certificates (router.http.tls): reread on every reload, or
    ConfigError, keeping the ones in use."""

    def reload(self) -> None: ...


@dataclass
class Runtime:
    config: RouterConfig
    config_path: Path | None
    calls: CallDesk
    watcher: Watcher
    tokens: Tokens
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    desk: HandoffDesk | None = None  # set while the service's desk is open
    mqtt: MqttLink | None = None
    audit: AuditLog | None = None
    publisher: Publisher | None = None
    started: RouterConfig = field(init=False)  # what the RESTART_ONLY settings still are
    certificates: Certificates | None = None  # set while serving HTTPS
    keeper: Keeper | None = None  # declarations on disk and shared between routers
    instance: str = "router"  # this router's name among several (router/infra/instance.py)
    leadership: Leadership | None = None  # whether it leads them

    _reload_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.started = self.config
        _config_metrics(self.config)

    async def reload_async(self, *, source: str = "manager") -> Reloaded:
        """Validate the config file again and swap it in whole, or raise and keep the old one;
        audited either way with `source` (who asked: `SIGHUP`, or the manager). The file is
        read, parsed and validated, and new CAD adapters built, in a thread, so a large file or
        a slow disk never stalls routing; the swap itself runs on the loop, awaiting nothing
        (so the audit chain is only ever written from the loop). One reload at a time."""
        async with self._reload_lock:
            try:
                config = await asyncio.to_thread(_read, self.config_path)
                built = (None if self.desk is None else
                         await asyncio.to_thread(self._built_for, self.desk, config))
            except ConfigError as exc:
                self._refused(source, exc)
                raise
            try:
                return self._swap(config, source, built)
            except ConfigError:  # refused after all (a certificate): the new adapters go
                for adapter in (built or {}).values():
                    await adapter.aclose()
                raise

    def _refused(self, source: str, exc: ConfigError) -> None:
        metrics.CONFIG_RELOADS.labels("refused").inc()
        _config_metrics(None)
        self._audit_refused(source, exc)

    def _swap(self, config: RouterConfig, source: str,
              built: dict[str, Adapter] | None = None) -> Reloaded:
        """Apply a validated config to every part (with the CAD adapters `built` for it
        already, off the loop), or raise ConfigError and change nothing."""
        try:
            if self.certificates is not None:  # renewed files; before any swap, as it may refuse
                self.certificates.reload()
            if self.desk is not None:
                self._reconfigure_desk(self.desk, config, built)
        except ConfigError as exc:
            self._refused(source, exc)
            raise
        self.config = config
        self.calls.reconfigure(config)
        self.watcher.reconfigure(config)
        if self.publisher is not None:
            self.publisher.reconfigure(config)
        self.tokens.load(config.service.tokens, self.environ)
        if self.mqtt is not None:
            self.mqtt.reconfigure(config.mqtt, self.environ)
        waiting = restart_required(self.started, config)
        if self.audit is not None:  # in the old file, which names the new one if it moves
            audit_log = Path(config.service.audit_log)
            moves = {"audit_log": str(audit_log)} if audit_log != self.audit.path else {}
            self.audit.event("reload", source=source, reason="applied", outcome="applied",
                             config=str(self.config_path), forces=list(config.forces),
                             restart_required=waiting, **moves)
            self.audit.move(audit_log)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        _config_metrics(config)
        log.info("config reloaded from %s: %d forces", self.config_path, len(config.forces))
        if waiting:
            log.warning("config reloaded, but these settings only change on a restart: %s",
                        ", ".join(waiting))
        return Reloaded(config, waiting)

    def _audit_refused(self, source: str, exc: ConfigError) -> None:
        if self.audit is not None:
            self.audit.event("reload", source=source,
                             reason="refused: the new config is invalid; the running one stays",
                             outcome="refused", config=str(self.config_path),
                             issues=[str(i) for i in exc.issues])

    def _built_for(self, desk: HandoffDesk, config: RouterConfig) -> dict[str, Adapter]:
        try:
            return desk.build(config)
        except AdapterConfigError as exc:
            raise self._adapter_issues(exc) from None

    def _reconfigure_desk(self, desk: HandoffDesk, config: RouterConfig,
                          built: dict[str, Adapter] | None = None) -> None:
        try:
            desk.reconfigure(config, built)
        except AdapterConfigError as exc:
            raise self._adapter_issues(exc) from None

    def _adapter_issues(self, exc: AdapterConfigError) -> ConfigError:
        issues = []
        for line in str(exc).splitlines():  # one `forces.X.cad: message` a line
            key, _, message = line.partition(": ")
            issues.append(ConfigIssue(str(self.config_path), 0, key, message))
        return ConfigError(issues)


def _read(path: Path | None) -> RouterConfig:
    """The config file parsed and validated; safe to run in a thread (it touches no state)."""
    if path is None:  # the demo builds its config in memory
        raise ConfigError([ConfigIssue(
            "(none)", 0, "(file)", "started without a config file: nothing to reload")])
    return load_config(path)


def config_hash(config: RouterConfig) -> str:
    """The effective config's fingerprint (canonical JSON, so layout and comments do not count):
    routers that should run the same rules show the same hash."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _config_metrics(config: RouterConfig | None) -> None:
    """The last load's time and result and, when applied (`config` given), what runs now."""
    metrics.CONFIG_LAST_RELOAD_SECONDS.set_to_current_time()
    metrics.CONFIG_LAST_RELOAD_SUCCESSFUL.set(0 if config is None else 1)
    if config is not None:
        metrics.CONFIG_INFO.clear()
        metrics.CONFIG_INFO.labels(config_hash(config), ",".join(config.forces)).set(1)


def restart_required(running: RouterConfig, new: RouterConfig) -> list[str]:
    """The RESTART_ONLY settings `new` changes, each by the path of a key that differs."""
    before, after = running.model_dump(mode="json"), new.model_dump(mode="json")
    return [key for path in RESTART_ONLY
            for key in _differences(path, _at(before, path), _at(after, path))]


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def _differences(key: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for sub in sorted(a.keys() | b.keys())
                for k in _differences(f"{key}.{sub}", a.get(sub), b.get(sub))]
    return [] if a == b else [key]

