"""Supervision of the service's long-lived parts: one that fails is logged, counted and
started again after a backoff, so one part's fault (a store, a broker, a bug) never stops call
routing, and a part that keeps failing does not spin."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from router.infra import metrics

log = logging.getLogger(__name__)

RESTART_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # before restarting a failed part, in turn
RESTART_RESET_S = 60.0  # a part that ran this long before failing starts the backoff afresh


async def keep_running(start: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    """Run `start()` until it returns or is cancelled, starting it again whenever it fails
    (`overflow_task_restarts_total{task=name}`)."""
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        began = loop.time()
        try:
            await start()
            return
        except Exception:
            if loop.time() - began > RESTART_RESET_S:
                failures = 0
            wait = RESTART_S[min(failures, len(RESTART_S) - 1)]
            failures += 1
            metrics.TASK_RESTARTS.labels(name).inc()
            log.exception("background task %s failed; restarting it in %.0f s", name, wait)
            await asyncio.sleep(wait)
