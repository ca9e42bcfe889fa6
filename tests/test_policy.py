"""Each rule of the decision engine, one at a time (semantics in router/policy.py's docstring).

Figures (queues, caps, weights) are read from the config under test, never written here, so
the tests follow the config rather than a copy of it.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
from configs.builder import config, force

from router.config import RouterConfig, load_config
from router.engine.ledger import Counts, Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot
from router.engine.policy import Policy

BUNDLED = load_config(Path(__file__).resolve().parent.parent / "config" / "forces.yaml")
S999, S101 = Service.EMERGENCY, Service.NON_EMERGENCY
NORMAL, DOWN = CentreState.NORMAL, CentreState.DOWN
CALL_IDS = itertools.count()


def snap(cfg: RouterConfig, **views: CentreView | CentreState) -> Snapshot:
    """Every centre normal and fully up, except those named."""
    centres = {fid: CentreView(NORMAL) for fid in cfg.forces}
    for fid, v in views.items():
        centres[fid] = v if isinstance(v, CentreView) else CentreView(v)
    return Snapshot(centres)


def decide(policy: Policy, ledger: Ledger, service: Service, origin: str, snapshot: Snapshot,
           count: int, *, now: float = 0.0, hold: bool = True) -> list[Decision]:
    """Decide `count` calls; each stays in flight (hold) or ends at once (no capacity used)."""
    out = []
    for _ in range(count):
        d = policy.decide(service, origin, snapshot, ledger, now)
        call_id = f"call-{next(CALL_IDS)}"
        ledger.add(call_id, d, now)
        if not hold:
            ledger.end(call_id)
        out.append(d)
    return out


def longest_run(items: list[str], value: str) -> int:
    return max((len(list(g)) for k, g in itertools.groupby(items) if k == value), default=0)


# ---- the home centre ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [CentreState.NORMAL, CentreState.UNKNOWN])
def test_home_keeps_its_calls_while_normal_or_unknown(state: CentreState) -> None:
    for service in Service:
        d = Policy(BUNDLED).decide(service, "met", snap(BUNDLED, met=state), Ledger(), 0.0)
        assert (d.destination, d.reason, d.rule) == ("met", Reason.HOME, f"state:{state.value}")
        assert d.sip_uri == BUNDLED.forces["met"].sip[service]


def test_normal_home_overflows_only_beyond_max_queue() -> None:
    c = BUNDLED.forces["kent"].centre
    ledger = Ledger()
    ledger.preload("kent", c.handlers_on_duty + c.max_queue - 3)
    ds = decide(Policy(BUNDLED), ledger, S999, "kent", snap(BUNDLED), 6)
    assert [d.destination == "kent" for d in ds] == [True] * 3 + [False] * 3
    assert {d.reason for d in ds[3:]} == {Reason.ORIGIN_OVERLOADED}
    assert {d.rule for d in ds[3:]} == {"forces.kent.overflow.999[0]",
                                        "forces.kent.overflow.999[1]",
                                        "forces.kent.overflow.999[2]"}


def test_overloaded_home_overflows_only_the_excess_over_its_threshold() -> None:
    c = BUNDLED.forces["met"].centre
    ledger = Ledger()
    ledger.preload("met", c.handlers_on_duty + c.overflow_queue - 4)
    policy = Policy(BUNDLED)
    ds = decide(policy, ledger, S999, "met", snap(BUNDLED, met=CentreState.OVERLOADED), 10)
    assert [d.destination == "met" for d in ds] == [True] * 4 + [False] * 6
    assert {d.rule for d in ds[:4]} == {"forces.met.centre.overflow_queue"}
    assert {d.reason for d in ds[4:]} == {Reason.ORIGIN_OVERLOADED}
    # when home calls end, home takes calls again: only the excess ever left
    for call_id, call in list(ledger.calls.items())[:2]:
        if call.destination == "met":
            ledger.end(call_id)
    again = decide(policy, ledger, S999, "met", snap(BUNDLED, met=CentreState.OVERLOADED), 3)
    assert [d.destination == "met" for d in again] == [True, True, False]


def test_telemetry_queue_counts_when_longer_than_our_own() -> None:
    c = BUNDLED.forces["met"].centre
    busy = CentreView(CentreState.OVERLOADED, calls_waiting=c.overflow_queue)
    d = Policy(BUNDLED).decide(S999, "met", snap(BUNDLED, met=busy), Ledger(), 0.0)
    assert d.reason is Reason.ORIGIN_OVERLOADED
    short = CentreView(CentreState.OVERLOADED, calls_waiting=c.overflow_queue - 1)
    assert Policy(BUNDLED).decide(S999, "met", snap(BUNDLED, met=short), Ledger(),
                                  0.0).reason is Reason.HOME


@pytest.mark.parametrize(("view", "reason", "rule"), [
    (CentreView(CentreState.DOWN), Reason.ORIGIN_DOWN, "forces.met.overflow"),
    (CentreView(CentreState.NORMAL, telephony_up=False), Reason.ORIGIN_DOWN, "forces.met.overflow"),
    (CentreView(CentreState.DRAINING), Reason.ORIGIN_DRAINING, "forces.met.overflow"),
])
def test_down_or_draining_home_sends_everything_to_partners(view: CentreView, reason: Reason,
                                                             rule: str) -> None:
    for service in Service:
        ds = decide(Policy(BUNDLED), Ledger(), service, "met", snap(BUNDLED, met=view), 50,
                    hold=False)
        assert all(d.destination != "met" and d.reason is reason for d in ds)
        assert all(d.rule.startswith(f"{rule}.{service.value}[") for d in ds)
        partners = {r.to for r in BUNDLED.forces["met"].overflow[service]}
        assert {d.destination for d in ds} == partners
        assert all(d.sip_uri == BUNDLED.forces[d.destination].sip[service] for d in ds)


def test_cad_down_keeps_or_overflows_as_each_force_configured() -> None:
    assert BUNDLED.forces["met"].centre.on_cad_down == "overflow"
    assert BUNDLED.forces["kent"].centre.on_cad_down == "keep"
    no_cad = CentreView(CentreState.NORMAL, cad_up=False)
    policy = Policy(BUNDLED)
    s = snap(BUNDLED, met=no_cad, kent=no_cad)
    met = policy.decide(S999, "met", s, Ledger(), 0.0)
    assert met.reason is Reason.ORIGIN_CAD_DOWN
    assert met.destination in {r.to for r in BUNDLED.forces["met"].overflow[S999]}
    kent = policy.decide(S999, "kent", s, Ledger(), 0.0)
    assert (kent.destination, kent.reason, kent.rule) == (
        "kent", Reason.HOME, "forces.kent.centre.on_cad_down")


def test_a_partner_with_cad_down_takes_no_aid() -> None:
    no_cad = CentreView(CentreState.NORMAL, cad_up=False)
    ds = decide(Policy(BUNDLED), Ledger(), S999, "met", snap(BUNDLED, met=DOWN, kent=no_cad),
                30, hold=False)
    assert "kent" not in {d.destination for d in ds}


# ---- recovery ramp --------------------------------------------------------------------------


def test_recovering_home_takes_back_each_ramp_step_smoothly() -> None:
    ramp, step_s = BUNDLED.health.recovery.ramp, BUNDLED.health.recovery.step_s
    since = 1000.0
    policy = Policy(BUNDLED)
    for step, share in enumerate(ramp):
        now = since + step * step_s + step_s / 2
        view = CentreView(CentreState.RECOVERING, since=since)
        n = 120
        ds = decide(policy, Ledger(), S999, "met", snap(BUNDLED, met=view), n, now=now,
                    hold=False)
        where = ["home" if d.destination == "met" else "away" for d in ds]
        assert abs(where.count("home") - share * n) <= 1
        if share < 1.0:
            # smooth: never more partner calls in a row than the ramp share implies
            assert longest_run(where, "away") <= math.ceil(1 / share) - 1
            assert longest_run(where, "home") <= math.ceil(share / (1 - share))
            away = [d for d in ds if d.destination != "met"]
            assert {d.reason for d in away} == {Reason.ORIGIN_RECOVERING}
            assert all(d.rule.startswith("forces.met.overflow.999[") for d in away)
            home = [d for d in ds if d.destination == "met"]
            assert {d.rule for d in home} == {f"health.recovery.ramp[{step}]"}
        else:
            assert where == ["home"] * n


def test_recovery_ramp_starts_at_since_not_at_zero() -> None:
    view = CentreView(CentreState.RECOVERING, since=500.0)
    before = Policy(BUNDLED).plan(S999, "met", snap(BUNDLED, met=view), Ledger(), now=500.0)
    assert before[0].destination == "met"
    assert before[0].share == BUNDLED.health.recovery.ramp[0]


# ---- partners -------------------------------------------------------------------------------


def test_partners_share_calls_by_weight_without_bursts() -> None:
    routes = BUNDLED.forces["met"].overflow[S999]
    total = sum(r.weight for r in routes)
    n = total * 20
    ds = decide(Policy(BUNDLED), Ledger(), S999, "met", snap(BUNDLED, met=DOWN), n, hold=False)
    counts = Counter(d.destination for d in ds)
    assert counts == {r.to: r.weight * 20 for r in routes}
    # smooth, not in blocks: every stretch of `total` calls holds each weight, give or take one
    seq = [d.destination for d in ds]
    for start in range(n - total + 1):
        window = Counter(seq[start:start + total])
        assert all(abs(window[r.to] - r.weight) <= 1 for r in routes), (start, window)


@pytest.mark.parametrize("state", [CentreState.OVERLOADED, CentreState.RECOVERING,
                                   CentreState.UNKNOWN, CentreState.DRAINING, DOWN])
def test_only_normal_partners_help(state: CentreState) -> None:
    ds = decide(Policy(BUNDLED), Ledger(), S999, "met", snap(BUNDLED, met=DOWN, kent=state),
                40, hold=False)
    assert "kent" not in {d.destination for d in ds}


def test_partner_with_a_long_queue_takes_no_aid() -> None:
    kent = BUNDLED.forces["kent"]
    busy = CentreView(NORMAL, calls_waiting=kent.mutual_aid.only_while_queue_below)
    ds = decide(Policy(BUNDLED), Ledger(), S999, "met", snap(BUNDLED, met=DOWN, kent=busy), 40,
                hold=False)
    assert "kent" not in {d.destination for d in ds}


def test_partner_cap_and_the_999_reserve() -> None:
    cfg = config(force("aa", routes_999=[("bb", 1)], routes_101=[("bb", 1)]),
                 force("bb", aid_max=6, reserve_999=2, aid_queue_below=100,
                       routes_999=[("aa", 1)], routes_101=[("aa", 1)]))
    ledger, policy, s = Ledger(), Policy(cfg), snap(cfg, aa=DOWN)
    r101 = decide(policy, ledger, S101, "aa", s, 6)
    assert [d.destination for d in r101] == ["bb"] * 4 + ["aa"] * 2  # 101 stops short of reserve
    assert {d.reason for d in r101[4:]} == {Reason.SHED}
    r999 = decide(policy, ledger, S999, "aa", s, 3)
    assert [d.reason for d in r999] == [Reason.ORIGIN_DOWN] * 2 + [Reason.LAST_RESORT]
    assert ledger.aid["bb"] == 7  # the reserve went to 999; only last_resort exceeds the cap


def test_per_route_cap_limits_one_origin_at_one_partner() -> None:
    city = next(r for r in BUNDLED.forces["met"].overflow[S999] if r.to == "city")
    assert city.max_concurrent is not None
    others = {r.to: CentreView(DOWN) for r in BUNDLED.forces["met"].overflow[S999]
              if r.to != "city"}
    ledger = Ledger()
    ds = decide(Policy(BUNDLED), ledger, S999, "met", snap(BUNDLED, met=DOWN, **others),
                city.max_concurrent + 2)
    assert [d.destination for d in ds[:city.max_concurrent]] == ["city"] * city.max_concurrent
    assert all(d.reason is Reason.LAST_RESORT for d in ds[city.max_concurrent:])
    assert ledger.aid_from[("city", "met")] >= city.max_concurrent


def test_standby_partner_with_weight_zero_only_when_no_weighted_one_can_help() -> None:
    cfg = config(force("aa", routes_999=[("bb", 1), ("cc", 0)], routes_101=[("bb", 1), ("cc", 0)]),
                 force("bb", routes_999=[("aa", 1)], routes_101=[("aa", 1)]),
                 force("cc", routes_999=[("aa", 1)], routes_101=[("aa", 1)]))
    policy = Policy(cfg)
    ds = decide(policy, Ledger(), S999, "aa", snap(cfg, aa=DOWN), 20, hold=False)
    assert {d.destination for d in ds} == {"bb"}
    ds = decide(policy, Ledger(), S999, "aa", snap(cfg, aa=DOWN, bb=DOWN), 5, hold=False)
    assert {(d.destination, d.reason, d.rule) for d in ds} == {
        ("cc", Reason.ORIGIN_DOWN, "forces.aa.overflow.999[1]")}


# ---- nobody can help ------------------------------------------------------------------------


def test_999_last_resort_goes_to_the_least_loaded_reachable_centre() -> None:
    cfg = config(force("aa", handlers=10, max_queue=10, routes_999=[("bb", 1), ("cc", 1)],
                       routes_101=[("bb", 1)]),
                 force("bb", handlers=10, max_queue=10, aid_max=0, routes_999=[("aa", 1)],
                       routes_101=[("aa", 1)]),
                 force("cc", handlers=40, max_queue=40, aid_max=0, routes_999=[("aa", 1)],
                       routes_101=[("aa", 1)]))
    ledger = Ledger()
    ledger.preload("bb", 8)  # 8/20 of its capacity
    ledger.preload("cc", 20)  # 20/80: less loaded, though it carries more calls
    d = Policy(cfg).decide(S999, "aa", snap(cfg, aa=DOWN), ledger, 0.0)
    assert (d.destination, d.reason, d.rule) == ("cc", Reason.LAST_RESORT,
                                                 "last_resort:least_loaded")
    d = Policy(cfg).decide(S999, "aa", snap(cfg, aa=DOWN, cc=DOWN), ledger, 0.0)
    assert d.destination == "bb"


def test_999_with_nothing_reachable_still_goes_home() -> None:
    everyone_down = {fid: CentreView(DOWN) for fid in BUNDLED.forces}
    d = Policy(BUNDLED).decide(S999, "met", Snapshot(everyone_down), Ledger(), 0.0)
    assert (d.destination, d.reason, d.rule) == ("met", Reason.LAST_RESORT,
                                                 "last_resort:none_reachable")
    assert d.sip_uri == BUNDLED.forces["met"].sip[S999]


def test_101_shed_to_home_queue_or_announcement() -> None:
    partners = {r.to: CentreView(DOWN) for r in BUNDLED.forces["met"].overflow[S101]}
    shed = BUNDLED.forces["met"].centre.shed_101
    policy = Policy(BUNDLED)
    c = BUNDLED.forces["met"].centre
    full = Ledger()
    full.preload("met", c.handlers_on_duty + c.max_queue)
    d = policy.decide(S101, "met", snap(BUNDLED, **partners), full, 0.0)
    assert (d.reason, d.action, d.sip_uri, d.destination) == (Reason.SHED, "queue", shed.queue,
                                                              "met")
    for closed in (CentreView(DOWN), CentreView(CentreState.DRAINING),
                   CentreView(NORMAL, telephony_up=False)):
        d = policy.decide(S101, "met", snap(BUNDLED, met=closed, **partners), Ledger(), 0.0)
        assert (d.reason, d.action, d.sip_uri, d.rule) == (
            Reason.SHED, "announcement", shed.announcement,
            "forces.met.centre.shed_101.announcement")


def test_101_is_shed_while_999_still_finds_a_partner() -> None:
    partners = [r.to for r in BUNDLED.forces["met"].overflow[S101]]
    ledger = Ledger()
    aids = {fid: BUNDLED.forces[fid].mutual_aid for fid in partners}
    # other routers' calls: every partner has only its 999 reserve left
    ledger.peers = Counts(aid={fid: a.max_concurrent - a.reserve_999 for fid, a in aids.items()})
    s = snap(BUNDLED, met=DOWN)
    policy = Policy(BUNDLED)
    assert policy.decide(S101, "met", s, ledger, 0.0).reason is Reason.SHED
    d = policy.decide(S999, "met", s, ledger, 0.0)
    assert d.reason is Reason.ORIGIN_DOWN and d.destination in partners


# ---- the plan -------------------------------------------------------------------------------


def test_plan_shares_add_up_and_do_not_move_the_round_robin() -> None:
    s = snap(BUNDLED, met=DOWN)
    policy = Policy(BUNDLED)
    shares = policy.plan(S999, "met", s, Ledger(), 0.0)
    routes = BUNDLED.forces["met"].overflow[S999]
    total = sum(r.weight for r in routes)
    assert {(p.destination, round(p.share, 9)) for p in shares} == {
        (r.to, round(r.weight / total, 9)) for r in routes}
    fresh = Policy(BUNDLED)
    a = decide(policy, Ledger(), S999, "met", s, 30, hold=False)
    b = decide(fresh, Ledger(), S999, "met", s, 30, hold=False)
    assert a == b
    assert policy.plan(S999, "met", snap(BUNDLED), Ledger(), 0.0)[0].share == 1.0
