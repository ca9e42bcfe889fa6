"""A long-lived part that fails is started again after a backoff, and counted."""

from __future__ import annotations

import asyncio

import pytest

from router.infra import metrics, supervise


async def test_a_failing_part_is_restarted_with_backoff_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "RESTART_S", (0.01, 0.02))
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise OSError("the store went away")

    before = metrics.TASK_RESTARTS.labels("flaky")._value.get()
    await asyncio.wait_for(supervise.keep_running(flaky, "flaky"), 5)
    assert runs == 3
    assert metrics.TASK_RESTARTS.labels("flaky")._value.get() == before + 2


async def test_cancelling_stops_it_at_once() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise.keep_running(forever, "forever"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
