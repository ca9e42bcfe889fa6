"""The handoff outbox, the same tests against SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.handoff.store import (
    HandoffStore,
    HistoryEntry,
    Need,
    StatusChange,
    StoredHandoff,
    StoreError,
    open_store,
    store_for,
)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[HandoffStore]:
    async with open_store(store_url) as s:
        yield s


def handoff(n: int, to: str = "kent", priority: str = "P2", at: float = 1000.0,
            status: str = "accepted") -> StoredHandoff:
    return StoredHandoff(
        id=f"h{n:05d}", from_force="met", incident_id=f"INC-{n}", to_force=to,
        priority=priority, status=status,
        incident={"incident_id": f"INC-{n}", "from": "met", "to": to, "summary": "é ✓ <b>"},
        accepted_at=at + n, updated_at=at + n,
        history=[HistoryEntry(at + n, status, "from met")])


async def test_insert_is_idempotent_and_round_trips(store: HandoffStore) -> None:
    assert await store.insert(handoff(1)) is True
    assert await store.insert(handoff(1)) is False
    got = await store.get("h00001")
    assert got is not None
    assert got.incident == handoff(1).incident
    assert got.history == [HistoryEntry(1001.0, "accepted", "from met")]
    assert await store.get("nope") is None


async def test_same_incident_from_same_force_is_refused_under_another_id(
        store: HandoffStore) -> None:
    assert await store.insert(handoff(1))
    twin = handoff(1)
    twin.id = "other-id"
    assert await store.insert(twin) is False  # UNIQUE (from_force, incident_id)
    assert await store.get("other-id") is None


async def test_changes_append_history_and_stamps(store: HandoffStore) -> None:
    await store.insert(handoff(7))
    await store.record(StatusChange("h00007", "delivering", 2000.0, "to kent", attempts=1))
    await store.record(StatusChange("h00007", "held", 2001.0, "CAD down", attempts=3,
                                    reason="HTTP 503"))
    await store.record(StatusChange("h00007", "escalated", 2002.0, "late", attempts=2,
                                    escalated_at=2002.0))
    await store.record(StatusChange("h00007", "delivered", 2003.0, "ack", attempts=4,
                                    delivered_at=2003.0))
    got = await store.get("h00007")
    assert got is not None
    assert [e.status for e in got.history] == ["accepted", "delivering", "held", "escalated",
                                               "delivered"]
    assert (got.status, got.attempts, got.reason) == ("delivered", 4, "HTTP 503")
    assert (got.escalated_at, got.delivered_at, got.updated_at) == (2002.0, 2003.0, 2003.0)


async def test_a_final_status_is_final(store: HandoffStore) -> None:
    await store.insert(handoff(3))
    await store.record(StatusChange("h00003", "failed", 2000.0, "refused", reason="no"))
    await store.record(StatusChange("h00003", "escalated", 2001.0, "late", escalated_at=2001.0))
    got = await store.get("h00003")
    assert got is not None and got.status == "failed" and got.escalated_at is None
    assert len(got.history) == 2


async def test_people_s_answers_keep_their_words_and_an_offer_readdresses(
        store: HandoffStore) -> None:
    await store.insert(handoff(4))
    await store.record(StatusChange("h00004", "delivered", 10.0, "ack", delivered_at=10.0))
    await store.record(StatusChange("h00004", "offered", 20.0, "rejected; offered to essex",
                                    data={"by": "PS 42 \x00", "cause": "not ours",
                                          "to": "essex"}, to_force="essex"))
    got = await store.get("h00004")
    assert got is not None and (got.status, got.to_force, got.delivered_at) == (
        "offered", "essex", None)  # to be delivered afresh, to the next partner
    assert got.history[-1].data == {"by": "PS 42 \ufffd", "cause": "not ours", "to": "essex"}
    await store.record(StatusChange("h00004", "delivered", 30.0, "ack", delivered_at=30.0))
    await store.record(StatusChange("h00004", "completed", 40.0, data={"outcome": "aborted"}))
    await store.record(StatusChange("h00004", "acknowledged", 50.0))  # after final: refused
    got = await store.get("h00004")
    assert got is not None and (got.status, got.delivered_at) == ("completed", 30.0)


async def test_recording_on_an_unknown_handoff_raises(store: HandoffStore) -> None:
    with pytest.raises(StoreError):
        await store.record(StatusChange("missing", "held", 1.0))


async def test_query_filters_and_unfinished(store: HandoffStore) -> None:
    for n in range(6):
        await store.insert(handoff(n, to="kent" if n % 2 else "essex"))
    await store.record(StatusChange("h00001", "delivered", 5.0, delivered_at=5.0))
    await store.record(StatusChange("h00002", "failed", 5.0, reason="refused"))
    await store.record(StatusChange("h00003", "held", 5.0))
    assert [h.id for h in await store.query(to="kent")] == ["h00001", "h00003", "h00005"]
    assert [h.id for h in await store.query(status="held")] == ["h00003"]
    assert [h.id for h in await store.query(status="accepted", to="essex")] == ["h00000",
                                                                                "h00004"]
    assert len(await store.query(limit=2)) == 2
    # what needs a router: not final, not delivered, or delivered (P2 awaited) since the mark
    await store.release()
    assert [h.id for h in await store.claim(Need(0.0, ("P2",)), limit=10)] == [
        "h00000", "h00001", "h00003", "h00004", "h00005"]
    await store.release()
    assert [h.id for h in await store.claim(Need(6.0, ("P2",)), limit=10)] == [
        "h00000", "h00003", "h00004", "h00005"]  # delivered before the mark: no longer watched
    await store.release()
    assert [h.id for h in await store.claim(Need(0.0, ()), limit=10)] == [
        "h00000", "h00003", "h00004", "h00005"]  # no deadline for an answer: nothing to watch


async def test_claims_pass_to_another_router_when_a_lease_ends(store_url: str) -> None:
    """Two routers on one store: what one accepted is its own while it renews; when it stops
    renewing, the other takes it after the lease; a release hands it over at once."""
    need = Need(0.0, ("P1",))
    async with open_store(store_url) as a, open_store(store_url) as b:
        a.owner, b.owner = "a", "b"
        a.lease_s = b.lease_s = 0.5
        for n in range(3):
            await a.insert(handoff(n, priority="P1" if n == 2 else "P2"))
        assert await b.claim(need, limit=10) == []
        assert await a.renew(["h00000", "h00001", "h00002"], need) == {
            "h00000", "h00001", "h00002"}
        await asyncio.sleep(0.7)  # a stops renewing
        taken = await b.claim(need, limit=10)
        assert [h.id for h in taken] == ["h00002", "h00000", "h00001"]  # P1 first
        assert await a.renew(["h00000", "h00001", "h00002"], need) == set()  # a lets go
        await b.record(StatusChange("h00001", "failed", 2000.0))
        assert await b.renew(["h00000", "h00001", "h00002"], need) == {"h00000", "h00002"}
        await b.release()
        assert {h.id for h in await a.claim(need, limit=10)} == {"h00000", "h00002"}
        await a.insert(handoff(9))
        a.owner = "a2"  # the same router restarted under a new name: its own wait a lease
        assert await a.claim(need, limit=10, mine=True) == [] or store_url.startswith("sqlite")


async def test_routers_claiming_at_once_never_share_a_handoff(store_url: str) -> None:
    """Three routers claiming together (SKIP LOCKED on PostgreSQL): each handoff once."""
    need = Need(0.0, ())
    async with contextlib.AsyncExitStack() as stack:
        seed = await stack.enter_async_context(open_store(store_url))
        seed.lease_s = 0.0  # its claims end at once: every row is up for taking
        await asyncio.gather(*(seed.insert(handoff(n)) for n in range(300)))
        await asyncio.sleep(0.05)
        stores = [await stack.enter_async_context(open_store(store_url)) for _ in range(3)]
        for n, s in enumerate(stores):
            s.owner = f"r{n}"
        rounds = await asyncio.gather(*(s.claim(need, limit=60) for s in stores
                                        for _ in range(3)))
        ids = [h.id for taken in rounds for h in taken]
        assert len(ids) == len(set(ids))
        assert len(ids) == 300 if store_url.startswith("postgres") else len(ids) >= 180
        rest = await stores[0].claim(need, limit=500)
        assert len(ids) + len(rest) == 300


async def test_concurrent_writes_are_group_committed(store: HandoffStore) -> None:
    n = 400
    results = await asyncio.gather(*(store.insert(handoff(i)) for i in range(n)),
                                   store.insert(handoff(0)))  # a duplicate inside the flood
    assert sum(results) == n
    assert store.rows == n + 1
    assert store.commits < n / 4, f"{store.commits} commits for {n} rows: not batching"
    assert len(await store.query(limit=1000)) == n


async def test_data_survives_reopening(store_url: str) -> None:
    async with open_store(store_url) as first:
        await first.insert(handoff(9))
        await first.record(StatusChange("h00009", "held", 3.0, "down"))
    async with open_store(store_url) as second:
        got = await second.get("h00009")
    assert got is not None and got.status == "held" and len(got.history) == 2


async def test_a_cancelled_caller_does_not_lose_the_commit(store: HandoffStore) -> None:
    task = asyncio.create_task(store.insert(handoff(11)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if await store.get("h00011") is not None:
            break
        await asyncio.sleep(0.01)
    assert await store.get("h00011") is not None


async def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}") as s:
        await s.insert(handoff(1))
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_url_is_checked() -> None:
    with pytest.raises(StoreError, match="unsupported"):
        store_for("mysql://x")
