"""The leader's lease: one router leads, another takes over when it stops or dies, and a
router cut off from the database leads rather than leave partners untold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from conftest import free_port
from handoff_support import wait_for

from router.infra import leader
from router.infra.leader import Leadership


@contextlib.asynccontextmanager
async def running(lead: Leadership) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(lead.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_one_leads_and_a_clean_stop_hands_over_at_once(store_url: str) -> None:
    a, b = Leadership(store_url, "a"), Leadership(store_url, "b")
    heard: list[bool] = []
    b.on_change(heard.append)
    async with running(b) as task_b:
        await wait_for(lambda: b.leading, 3)
        async with running(a):
            await asyncio.sleep(2.5)  # rounds in which b renews and a is refused
            assert b.leading and not a.leading
            task_b.cancel()  # a clean stop gives the lease up
            with contextlib.suppress(asyncio.CancelledError):
                await task_b
            await wait_for(lambda: a.leading, 2 * leader.EVERY_S + 0.5)
    assert heard == [True, False]


async def test_a_dead_leaders_lease_is_taken_once_it_expires(store_url: str,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    a, b = Leadership(store_url, "a"), Leadership(store_url, "b")
    async with running(a) as task_a:
        await wait_for(lambda: a.leading, 3)
        async def dead() -> None:  # killed: it gives nothing up
            pass
        monkeypatch.setattr(a, "_give_up", dead)
        task_a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_a
    async with running(b):
        began = asyncio.get_running_loop().time()
        await wait_for(lambda: b.leading, leader.LEASE_S + 2 * leader.EVERY_S + 1)
        took = asyncio.get_running_loop().time() - began
    assert took > leader.LEASE_S - leader.EVERY_S - 0.5  # not before the lease ran out


async def test_a_router_cut_off_from_the_database_leads_after_a_lease() -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # nothing listens
    lone = Leadership(nowhere, "lone")
    async with running(lone):
        await asyncio.sleep(1.0)
        assert not lone.leading  # not at once: the database may only be slow
        await wait_for(lambda: lone.leading, leader.LEASE_S + 2 * leader.EVERY_S + 1)
