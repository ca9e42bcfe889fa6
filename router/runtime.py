"""The running service's parts, held together so handlers and the lifecycle share one view."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from router import metrics
from router.auth import TokenBook
from router.calls import CallDesk
from router.config import ConfigError, ConfigIssue, RouterConfig, load_config
from router.watcher import Watcher

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: RouterConfig
    config_path: Path | None
    calls: CallDesk
    watcher: Watcher
    tokens: TokenBook
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def reload(self) -> RouterConfig:
        """Validate the config file again and swap it in whole, or raise and keep the old one.

        Nothing awaits between the swaps below, so no request sees half of each config.
        """
        if self.config_path is None:  # the demo builds its config in memory
            raise ConfigError([ConfigIssue("(none)", 0, "(file)",
                                           "started without a config file: nothing to reload")])
        try:
            config = load_config(self.config_path)
        except ConfigError:
            metrics.CONFIG_RELOADS.labels("refused").inc()
            raise
        self.config = config
        self.calls.reconfigure(config)
        self.watcher.reconfigure(config)
        self.tokens.load(config.service.tokens, self.environ)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info("config reloaded from %s: %d forces", self.config_path, len(config.forces))
        return config


RUNTIME = web.AppKey("runtime", Runtime)
