"""The policy's facts (router/engine/rules.py): why a force diverts, and that every view —
the policy's decisions, partners' alerts — agrees with them."""

from __future__ import annotations

from pathlib import Path

from configs.builder import config, force
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import load_config
from router.engine.calls import CallDesk
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Reason, Service, Snapshot
from router.engine.policy import Policy
from router.engine.rules import Cause, HomeShare, Rules, aid_cap, headline
from router.watch.alerts import Alerter

BUNDLED = load_config(Path(__file__).resolve().parent.parent / "config" / "forces.yaml")
S = CentreState
CFG = config(
    force("met", handlers=10, overflow_queue=2, max_queue=5, on_cad_down="overflow",
          routes_999=[("kent", 1)], routes_101=[("kent", 1)]),
    force("kent", routes_999=[("met", 1)], routes_101=[("met", 1)]),
)


def share(view: CentreView, in_flight: int = 0, now: float = 0.0,
          origin: str = "met") -> HomeShare:
    rules = Rules(CFG)
    ledger = Ledger()
    ledger.preload(origin, in_flight)
    return rules.home_share(rules.forces[origin], view, ledger, now)


def test_cad_down_with_overflow_diverts_everything_because_of_the_cad() -> None:
    s = share(CentreView(S.NORMAL, cad_up=False))
    assert s.diverting and s.share == 0.0 and s.cause is Cause.CAD_DOWN
    assert s.reason is Reason.ORIGIN_CAD_DOWN and s.rule == "forces.met.centre.on_cad_down"
    kept = Rules(CFG)
    kent = kept.home_share(kept.forces["kent"], CentreView(S.NORMAL, cad_up=False), Ledger(), 0)
    assert not kent.diverting and kent.cause is None  # on_cad_down: keep


def test_overloaded_below_overflow_queue_keeps_its_calls() -> None:
    below = share(CentreView(S.OVERLOADED, calls_waiting=1))
    assert not below.diverting and below.reason is Reason.HOME
    past = share(CentreView(S.OVERLOADED, calls_waiting=2))
    assert past.diverting and past.cause is Cause.OVERLOADED


def test_a_normal_centre_past_max_queue_diverts_as_overloaded() -> None:
    assert not share(CentreView(S.NORMAL), in_flight=10 + 4).diverting
    s = share(CentreView(S.NORMAL), in_flight=10 + 5)
    assert s.diverting and s.cause is Cause.OVERLOADED
    assert s.rule == "forces.met.centre.max_queue"


def test_declared_states_are_the_managers_doing_but_evidence_keeps_its_cause() -> None:
    assert share(CentreView(S.DOWN, declared=True)).cause is Cause.DECLARED
    assert share(CentreView(S.DRAINING, declared=True)).cause is Cause.DECLARED
    assert share(CentreView(S.DOWN)).cause is Cause.DOWN
    # declared normal, but the phones are down: that is the evidence's doing
    assert share(CentreView(S.NORMAL, telephony_up=False, declared=True)).cause is Cause.DOWN
    # declared normal with its CAD down: the CAD rule sends calls away
    assert share(CentreView(S.NORMAL, cad_up=False, declared=True)).cause is Cause.CAD_DOWN
    # declared normal, past max_queue: overloaded, not declared
    assert share(CentreView(S.NORMAL, declared=True), in_flight=15).cause is Cause.OVERLOADED


def test_recovering_diverts_the_rest_of_the_ramp_then_stops() -> None:
    s = share(CentreView(S.RECOVERING, since=0.0), now=1.0)
    assert s.diverting and s.share == 0.25 and s.cause is Cause.RECOVERING
    assert s.as_json()["share_diverted"] == 0.75
    done = share(CentreView(S.RECOVERING, since=0.0), now=3 * 30.0 + 1)
    assert not done.diverting and done.cause is None  # the ramp's last step keeps all


def test_the_101_cap_leaves_the_999_reserve() -> None:
    aid = BUNDLED.forces["kent"].mutual_aid
    assert aid_cap(aid, Service.EMERGENCY) == aid.max_concurrent
    assert aid_cap(aid, Service.NON_EMERGENCY) == aid.max_concurrent - aid.reserve_999
    rules = Rules(BUNDLED)
    ledger = Ledger()
    assert rules.headroom("kent", ledger) == {
        Service.EMERGENCY: aid.max_concurrent,
        Service.NON_EMERGENCY: aid.max_concurrent - aid.reserve_999}


views = st.builds(
    CentreView, state=st.sampled_from([s for s in CentreState if s is not S.RECOVERING]),
    telephony_up=st.booleans(), cad_up=st.booleans(),
    calls_waiting=st.none() | st.integers(0, 10), declared=st.booleans())


@settings(max_examples=300, deadline=None)
@given(view=views, in_flight=st.integers(0, 20), service=st.sampled_from(list(Service)))
def test_the_policy_keeps_a_call_home_exactly_when_the_rules_say_so(
        view: CentreView, in_flight: int, service: Service) -> None:
    snapshot = Snapshot({"met": view, "kent": CentreView(S.NORMAL)})
    ledger = Ledger()
    ledger.preload("met", in_flight)
    policy = Policy(CFG)
    decision = policy.decide(service, "met", snapshot, ledger, 0.0)
    home = policy.home_share("met", snapshot, ledger, 0.0)
    assert (decision.reason is Reason.HOME) == (not home.diverting)
    if home.diverting and decision.destination == "kent":
        assert decision.reason is home.reason


def test_partners_hear_of_a_diversion_only_when_the_policy_makes_one() -> None:
    desk = CallDesk(CFG, clock=lambda: 0.0)
    alerter = Alerter(CFG, mqtt=None, wall_clock=lambda: 0.0)

    def observe(view: CentreView) -> None:
        snapshot = Snapshot({"met": view, "kent": CentreView(S.NORMAL)})
        alerter.observe(desk.diversions(snapshot), snapshot)

    observe(CentreView(S.OVERLOADED, calls_waiting=1))  # keeps its calls: no alert
    assert alerter.sent == []
    observe(CentreView(S.NORMAL, cad_up=False))
    observe(CentreView(S.NORMAL))
    assert [(a["event"], a["reason"], a["cause"]) for a in alerter.sent] == [
        ("started", "origin_cad_down", "cad_down"), ("stopped", None, None)]


def test_the_headline_says_what_the_policy_does() -> None:
    assert headline(S.NORMAL, share(CentreView(S.NORMAL, cad_up=False))) == \
        "diverting — CAD down"
    assert headline(S.NORMAL, share(CentreView(S.NORMAL), in_flight=15)) == \
        "diverting — queue full"
    assert headline(S.NORMAL, share(CentreView(S.NORMAL, telephony_up=False))) == \
        "diverting — phones down"
    assert headline(S.DOWN, share(CentreView(S.DOWN))) == "down — diverting"
    assert headline(S.DOWN, share(CentreView(S.DOWN, declared=True))) == \
        "down — diverting (declared)"
    assert headline(S.RECOVERING, share(CentreView(S.RECOVERING), now=1.0)) == \
        "recovering — diverting 75%"
    assert headline(S.OVERLOADED, share(CentreView(S.OVERLOADED, calls_waiting=1))) == \
        "overloaded"
