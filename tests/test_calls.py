"""The call desk: idempotent retries, conflicts, ending, expiry, and the published shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import load_config
from router.engine.calls import CallConflict, CallDesk
from router.engine.model import CentreState, CentreView, Service, Snapshot

CONFIG = load_config(Path(__file__).resolve().parent.parent / "config" / "forces.yaml")
ALL_NORMAL = Snapshot({f: CentreView(CentreState.NORMAL) for f in CONFIG.forces})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_retried_call_gets_its_first_decision_and_is_counted_once() -> None:
    desk = CallDesk(CONFIG, Clock())
    snapshot = ALL_NORMAL.with_centre("met", CentreView(CentreState.DOWN))
    first, new = desk.route("c1", Service.EMERGENCY, "met", snapshot)
    again, new_again = desk.route("c1", Service.EMERGENCY, "met", snapshot)
    assert new and not new_again
    assert again == first
    assert desk.load(first["destination"]) == {"in_flight": 1, "aid": 1, "in_flight_999": 1,
                                               "in_flight_101": 0}


def test_the_same_call_id_for_another_origin_is_a_conflict() -> None:
    desk = CallDesk(CONFIG, Clock())
    desk.route("c1", Service.EMERGENCY, "met", ALL_NORMAL)
    with pytest.raises(CallConflict, match="routed as 999 from met"):
        desk.route("c1", Service.EMERGENCY, "kent", ALL_NORMAL)


def test_ending_frees_capacity_and_is_idempotent() -> None:
    desk = CallDesk(CONFIG, Clock())
    desk.route("c1", Service.NON_EMERGENCY, "kent", ALL_NORMAL)
    assert desk.load("kent")["in_flight"] == 1
    assert desk.end("c1") is True
    assert desk.end("c1") is False
    assert desk.load("kent")["in_flight"] == 0
    # once ended, the id may be routed afresh
    _, new = desk.route("c1", Service.NON_EMERGENCY, "kent", ALL_NORMAL)
    assert new


def test_calls_never_ended_expire_after_the_maximum_duration() -> None:
    clock = Clock()
    desk = CallDesk(CONFIG, clock)
    desk.route("old", Service.EMERGENCY, "met", ALL_NORMAL)
    clock.now += CONFIG.service.max_call_duration_s - 1
    desk.route("young", Service.EMERGENCY, "met", ALL_NORMAL)
    assert desk.expire() == 0
    clock.now += 2
    assert desk.expire() == 1
    assert desk.load("met")["in_flight"] == 1
    assert desk.end("old") is False and desk.end("young") is True


def test_decision_ids_are_unique_and_records_follow_the_contract() -> None:
    desk = CallDesk(CONFIG, Clock())
    records = [desk.route(f"c{i}", Service.EMERGENCY, "met", ALL_NORMAL)[0] for i in range(50)]
    assert len({r["decision_id"] for r in records}) == 50
    assert set(records[0]) == {"call_id", "service", "origin", "destination", "sip_uri", "reason",
                               "rule", "decision_id", "decided_at"}


def test_routing_table_shows_partner_shares_when_home_is_down() -> None:
    desk = CallDesk(CONFIG, Clock())
    table = desk.routing_table(ALL_NORMAL.with_centre("met", CentreView(CentreState.DOWN)))
    shares = {s["destination"]: s["share"] for s in table["met"]["999"]}
    weights = {r.to: r.weight for r in CONFIG.forces["met"].overflow[Service.EMERGENCY]}
    total = sum(weights.values())
    assert shares == pytest.approx({k: w / total for k, w in weights.items()}, abs=1e-3)
    assert table["kent"]["999"] == [{"destination": "kent", "share": 1.0, "reason": "home",
                                     "rule": "state:normal"}]
