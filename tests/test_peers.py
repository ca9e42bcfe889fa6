"""Mutual-aid caps across routers, without a broker: the ledger's totals (own + peers), the
counts' wire format, and how silent routers and a previous life are counted (router.watch.peers
with the clocks given)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
from configs.builder import config, force
from hypothesis import given
from hypothesis import strategies as st
from test_policy_properties import SETTINGS, World, worlds

from router.engine.calls import CallDesk
from router.engine.ledger import Counts, Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot
from router.engine.policy import Policy
from router.watch.peers import DECAY_S, HOLD_S, PeerBook, decode, encode, remaining, topic

FORCES = ("aa", "bb", "cc")
S999, S101 = Service.EMERGENCY, Service.NON_EMERGENCY


def decision(origin: str, destination: str, service: Service = S999) -> Decision:
    return Decision(service, origin, destination, f"sip:{destination}", Reason.ORIGIN_DOWN, "r")


counts_st = st.builds(
    Counts,
    st.dictionaries(st.sampled_from(FORCES), st.integers(1, 50), max_size=3),
    st.dictionaries(st.sampled_from(FORCES), st.integers(1, 50), max_size=3),
    st.dictionaries(st.tuples(st.sampled_from(FORCES), st.sampled_from(FORCES)),
                    st.integers(1, 50), max_size=4),
    st.dictionaries(st.tuples(st.sampled_from(FORCES), st.sampled_from(list(Service))),
                    st.integers(1, 50), max_size=4),
)
calls_st = st.lists(st.tuples(st.sampled_from(FORCES), st.sampled_from(FORCES),
                              st.sampled_from(list(Service)), st.booleans()), max_size=40)


# ---- the ledger's totals -----------------------------------------------------------------

@given(calls=calls_st, peers=counts_st, later=counts_st)
def test_totals_are_own_plus_peers_whatever_the_order_of_changes(
        calls: list[tuple[str, str, Service, bool]], peers: Counts, later: Counts) -> None:
    ledger = Ledger()
    for n, (origin, to, service, ends) in enumerate(calls):
        if n == len(calls) // 2:
            ledger.peers = peers  # peers change between own changes, not only before
        ledger.add(f"c{n}", decision(origin, to, service), float(n))
        if ends:
            ledger.end(f"c{n - 1}")
    ledger.preload("cc", 2)
    for told in (peers, later, Counts()):
        ledger.peers = told
        own = ledger.own()
        for f in FORCES:
            assert ledger.total_in_flight.get(f, 0) == \
                own.in_flight.get(f, 0) + told.in_flight.get(f, 0)
            assert ledger.total_aid.get(f, 0) == own.aid.get(f, 0) + told.aid.get(f, 0)
            for o in FORCES:
                assert ledger.total_aid_from.get((f, o), 0) == \
                    own.aid_from.get((f, o), 0) + told.aid_from.get((f, o), 0)
            for s in Service:
                assert ledger.total_by_service.get((f, s), 0) == \
                    own.by_service.get((f, s), 0) + told.by_service.get((f, s), 0)


@dataclass(frozen=True)
class Split:
    world: World
    mine: list[bool]  # per operation: routed by this router (True) or by the other


@st.composite
def splits(draw: st.DrawFn) -> Split:
    world = draw(worlds())
    # some centres down, so that calls go to partners and caps are reached
    down = draw(st.sets(st.sampled_from(list(world.cfg.forces))))
    views = {f: CentreView(CentreState.DOWN) if f in down else world.snapshot.get(f)
             for f in world.cfg.forces}
    world = replace(world, snapshot=Snapshot(views))
    return Split(world, draw(st.lists(st.booleans(), min_size=len(world.ops),
                                      max_size=len(world.ops))))


@given(split=splits())
@SETTINGS
def test_two_routers_told_each_others_counts_decide_as_one_router_seeing_every_call(
        split: Split) -> None:
    """Each call is routed by one of two routers that learn each other's counts before the
    next call (calls spaced beyond the publication interval): every decision is the one a
    single router seeing every call makes, so every cap holds as for one router."""
    world = split.world
    alone, one, other = Ledger(), Ledger(), Ledger()
    for fid, n in world.preload.items():
        alone.preload(fid, n)
        one.preload(fid, n)
    single, policy = Policy(world.cfg), Policy(world.cfg)  # the same round-robin position
    ids = list(world.cfg.forces)
    for n, ((op, service, index), mine) in enumerate(zip(world.ops, split.mine, strict=True)):
        router = one if mine else other
        one.peers, other.peers = other.own(), one.own()  # told before the next call
        if op == "end":
            if alone.calls:
                call_id = list(alone.calls)[index % len(alone.calls)]
                alone.end(call_id)
                one.end(call_id)
                other.end(call_id)
            continue
        origin = ids[index % len(ids)]
        expected = single.decide(service, origin, world.snapshot, alone, world.now)
        got = policy.decide(service, origin, world.snapshot, router, world.now)
        assert got == expected
        alone.add(f"c{n}", expected, world.now)
        router.add(f"c{n}", got, world.now)


# ---- counts on the wire ------------------------------------------------------------------

@given(counts=counts_st)
def test_counts_survive_the_wire(counts: Counts) -> None:
    assert decode(encode(counts)) == counts


@pytest.mark.parametrize("wire", [
    [], {"aid": []}, {"aid": {"bb": -1}}, {"aid": {"bb": 1.5}}, {"aid": {"bb": True}},
    {"aid": {"bb": 10**9}}, {"aid_from": {"bb": 3}}, {"by_service": {"bb": {"112": 1}}},
])
def test_a_malformed_count_is_refused(wire: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode(wire)


def test_instance_names_are_one_topic_level() -> None:
    assert topic("host:123") == "instances/host:123/load"
    assert topic("a/b+#") == "instances/a_b__/load"


@given(counts=counts_st, share=st.floats(0, 1))
def test_a_share_of_calls_is_rounded_up(counts: Counts, share: float) -> None:
    part = counts.scaled(share)
    for key, n in counts.aid.items():
        assert part.aid.get(key, 0) == math.ceil(n * share)
        assert n * share <= part.aid.get(key, 0) <= n


# ---- silent routers and a previous life ----------------------------------------------------

def message(boot: str, seq: int, at: float, aid: int, *, final: bool = False) -> dict[str, Any]:
    counts = Counts({"bb": aid}, {"bb": aid}, {("bb", "aa"): aid}, {("bb", S999): aid})
    return {"instance": "x", "boot": boot, "seq": seq, "at": at, "final": final,
            "counts": encode(counts)}


def test_remaining_holds_then_counts_down_in_a_straight_line() -> None:
    assert remaining(0.0, HOLD_S, DECAY_S) == remaining(HOLD_S, HOLD_S, DECAY_S) == 1.0
    assert remaining(HOLD_S + DECAY_S / 4, HOLD_S, DECAY_S) == pytest.approx(0.75)
    assert remaining(HOLD_S + DECAY_S, HOLD_S, DECAY_S) == 0.0
    assert remaining(1e9, HOLD_S, DECAY_S) == 0.0


def test_a_silent_router_is_held_then_counted_down_then_forgotten() -> None:
    book = PeerBook("me", "boot-me", started_wall=1000.0)
    assert book.hear("x", message("b1", 1, 1000.0, 10), now=0.0, wall=1000.0)
    assert book.live(0.0) == (1, 0)
    assert book.summary(HOLD_S).aid == {"bb": 10}  # held in full while it may be alive
    assert book.live(HOLD_S + 0.1) == (0, 1)
    assert book.summary(HOLD_S + DECAY_S / 2).aid == {"bb": 5}
    assert book.summary(HOLD_S + DECAY_S * 0.99).aid == {"bb": 1}  # rounded up
    assert book.forget(HOLD_S + DECAY_S * 0.99) == []
    assert book.summary(HOLD_S + DECAY_S).aid == {}
    assert book.forget(HOLD_S + DECAY_S) == ["x"]
    assert book.peers == {}


def test_a_live_router_is_counted_in_full_and_a_redelivery_says_nothing_new() -> None:
    book = PeerBook("me", "boot-me", started_wall=0.0)
    book.hear("x", message("b1", 1, 0.0, 4), now=0.0, wall=0.0)
    assert book.hear("x", message("b1", 2, 0.5, 6), now=2.5, wall=2.5)  # its clock is behind
    assert book.summary(2.5 + HOLD_S).aid == {"bb": 6}  # heard at 2.5, whatever `at` said
    # after a reconnection the broker sends the retained message again: it is not news
    assert not book.hear("x", message("b1", 2, 0.5, 6), now=50.0, wall=50.0)
    assert book.live(50.0) == (0, 1)


def test_a_retained_message_is_aged_by_its_time_and_a_clean_stop_counts_down_at_once() -> None:
    book = PeerBook("me", "boot-me", started_wall=5000.0)
    book.hear("old", message("b1", 9, 5000.0 - 600, 30), now=10.0, wall=5000.0)  # 10 min old
    assert book.summary(10.0).aid == {"bb": math.ceil(30 * remaining(600, HOLD_S, DECAY_S))}
    book.hear("stopped", message("b2", 3, 5000.0, 10, final=True), now=10.0, wall=5000.0)
    assert book.live(10.0) == (0, 2)
    assert book.summary(10.0 + DECAY_S / 2).aid["bb"] < 10
    assert book.hear("stopped", None, now=11.0, wall=5001.0)  # cleared: forgotten
    assert set(book.peers) == {"old"}


def test_a_restarted_router_recalls_its_previous_lifes_calls_and_publishes_them() -> None:
    book = PeerBook("me", "boot-new", started_wall=2000.0)
    # our previous life's retained message, 2 s before this start
    assert book.hear("me", message("boot-old", 40, 1998.0, 8), now=0.0, wall=2000.0)
    assert book.peers == {}
    assert book.summary(0.0).aid == {"bb": 8} == book.recalled_counts(0.0).aid
    assert book.recalled_counts(HOLD_S - 2 + DECAY_S / 2).aid == {"bb": 4}
    # our own words echoed, and the old message redelivered, change nothing
    assert not book.hear("me", message("boot-new", 1, 2000.1, 0), now=0.1, wall=2000.1)
    assert not book.hear("me", message("boot-old", 40, 1998.0, 8), now=5.0, wall=2005.0)
    assert not book.twin
    assert book.forget(DECAY_S + HOLD_S) == [] and book.recalled is None


def test_another_live_router_with_the_same_name_is_not_taken_for_our_past() -> None:
    book = PeerBook("me", "boot-new", started_wall=2000.0)
    assert not book.hear("me", message("boot-twin", 5, 2003.0, 8), now=3.0, wall=2003.0)
    assert book.twin and book.recalled is None and book.summary(3.0) == Counts()


def test_the_engine_reads_peers_counts_for_caps_queues_and_headroom() -> None:
    cfg = config(force("aa", routes_999=[("bb", 1)], routes_101=[("bb", 1)]),
                 force("bb", aid_max=3, handlers=2, max_queue=20, aid_queue_below=10))
    policy = Policy(cfg)
    snapshot = Snapshot({"aa": CentreView(CentreState.DOWN), "bb": CentreView(CentreState.NORMAL)})
    ledger = Ledger()
    assert policy.decide(S101, "aa", snapshot, ledger, 0.0).destination == "bb"
    ledger.peers = Counts({"bb": 3}, {"bb": 3}, {("bb", "aa"): 3}, {("bb", S101): 3})
    assert policy.decide(S101, "aa", snapshot, ledger, 0.0).reason is Reason.SHED  # cap reached
    assert policy.rules.headroom("bb", ledger) == {S999: 0, S101: 0}
    assert policy.rules.queue(policy.rules.forces["bb"], snapshot.get("bb"), ledger) == 1


def test_every_end_telephony_reports_is_passed_on_but_not_one_passed_on_already() -> None:
    cfg = config(force("aa", routes_999=[("bb", 1)]), force("bb"))
    desk = CallDesk(cfg)
    told: list[str] = []
    desk.on_end = told.append
    desk.route("mine", S999, "aa", Snapshot({}))
    assert desk.finish("mine") == "aa"
    assert desk.finish("theirs") is None  # routed by another router: it frees it
    assert desk.finish("from-a-peer", passed_on=True) is None
    assert told == ["mine", "theirs"]
