"""The pure per-centre state machine, driven in virtual time."""

from __future__ import annotations

from datetime import UTC, datetime

from health_support import make_config
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import CentreState, Service, Snapshot
from router.engine.policy import Policy
from router.watch.health import CentreHealth, Component, Override, probe_id
from router.watch.telemetry import Telemetry

SIP = {"kind": "sip", "target": "127.0.0.1:5060", "component": "telephony"}
HTTP = {"kind": "http", "target": "http://127.0.0.1:1/health", "component": "cad"}
CONFIG = make_config(probes={"met": [SIP, HTTP]})
H = CONFIG.health
MET = CONFIG.forces["met"]
TEL = probe_id(MET.centre.probes[0])
CAD = probe_id(MET.centre.probes[1])
S = CentreState


def machine(force: str = "met", config: RouterConfig = CONFIG) -> CentreHealth:
    return CentreHealth(force, config.health, config.forces[force].centre)


def reading(**over: object) -> Telemetry:
    base: dict[str, object] = {"ts": datetime.now(UTC), "telephony_up": True, "cad_up": True,
                               "calls_waiting": 0, "handlers_available": 10,
                               "handlers_on_duty": 120, "oldest_wait_s": 0.0}
    return Telemetry.model_validate({**base, **over})


def feed(m: CentreHealth, ok: bool, start: float, n: int, step: float = H.interval_s) -> float:
    t = start
    for _ in range(n):
        m.probe_result(TEL, ok, t, "test")
        t += step
    return t


def test_unknown_until_evidence_then_normal_on_first_answer() -> None:
    m = machine()
    assert m.view.state is S.UNKNOWN
    t = m.probe_result(TEL, True, 1.0)
    assert t is not None and t.after is S.NORMAL and m.view.since == 1.0


def test_down_after_exactly_unhealthy_threshold_consecutive_failures() -> None:
    m = machine()
    feed(m, True, 0.0, 1)
    t = feed(m, False, 1.0, H.unhealthy_threshold - 1)
    m.probe_result(TEL, True, t)  # a success resets the streak
    t = feed(m, False, t + 1, H.unhealthy_threshold - 1)
    assert m.view.state is S.NORMAL
    tr = m.probe_result(TEL, False, t, "timeout")
    assert tr is not None and tr.after is S.DOWN and tr.source == "probe"
    assert not m.view.telephony_up
    # detection time runs from the first failure of the streak
    assert tr.detection_s is not None
    assert abs(tr.detection_s - (H.unhealthy_threshold - 1) * H.interval_s) < 1e-9


def test_recovery_needs_healthy_threshold_then_follows_the_ramp() -> None:
    m = machine()
    feed(m, True, 0.0, 1)
    t = feed(m, False, 1.0, H.unhealthy_threshold)
    t = feed(m, True, t, H.healthy_threshold - 1)
    assert m.view.state is S.DOWN
    back = m.probe_result(TEL, True, t)
    assert back is not None and back.after is S.RECOVERING and m.view.since == t
    policy, ledger = Policy(CONFIG), Ledger()
    step = H.recovery.step_s
    for i, share in enumerate(H.recovery.ramp[:-1]):
        now = t + i * step + step / 2
        assert m.tick(now) is None
        plan = policy.plan(Service.EMERGENCY, "met", Snapshot({"met": m.view}), ledger, now)
        assert plan[0].destination == "met" and plan[0].share == share
    done = m.tick(t + (len(H.recovery.ramp) - 1) * step)
    assert done is not None and done.after is S.NORMAL


def test_telemetry_is_immediate_evidence_and_cad_is_separate() -> None:
    m = machine()
    feed(m, True, 0.0, 1)
    tr = m.telemetry(reading(telephony_up=False), 5.0, 5.0)
    assert tr is not None and tr.after is S.DOWN and tr.source == "telemetry"
    assert tr.detection_s == 0.0
    m2 = machine()
    feed(m2, True, 0.0, 1)
    assert m2.telemetry(reading(cad_up=False), 5.0, 5.0) is None  # state stays normal
    assert m2.view.state is S.NORMAL and m2.view.telephony_up and not m2.view.cad_up


def test_overload_has_hysteresis() -> None:
    levels = MET.centre.overload
    assert levels is not None and levels.enter.calls_waiting and levels.leave.calls_waiting
    enter, leave = levels.enter.calls_waiting, levels.leave.calls_waiting
    m = machine()
    feed(m, True, 0.0, 1)
    m.telemetry(reading(calls_waiting=enter - 1), 1.0, 1.0)
    assert m.view.state is S.NORMAL
    m.telemetry(reading(calls_waiting=enter), 2.0, 2.0)
    assert m.view.state is S.OVERLOADED and m.view.calls_waiting == enter
    m.telemetry(reading(calls_waiting=leave + 1), 3.0, 3.0)  # between the levels: stays
    assert m.view.state is S.OVERLOADED
    m.telemetry(reading(calls_waiting=leave), 4.0, 4.0)
    assert m.view.state is S.NORMAL


def test_stale_telemetry_is_missing_never_healthy() -> None:
    m = machine("kent", make_config())  # no probes: telemetry is the only evidence
    m.telemetry(reading(), 0.0, 0.0)
    assert m.view.state is S.NORMAL and m.view.calls_waiting == 0
    m.tick(H.telemetry_max_age_s + 0.01)
    assert m.view.state is S.UNKNOWN and m.view.calls_waiting is None
    # a centre last seen down stays down when its evidence goes stale
    m.telemetry(reading(telephony_up=False), 20.0, 20.0)
    m.tick(20.0 + H.telemetry_max_age_s + 1)
    assert m.view.state is S.DOWN


def test_frozen_telemetry_stands_while_fail_static_then_expires() -> None:
    m = machine("kent", make_config())
    levels = CONFIG.forces["kent"].centre.overload
    assert levels is not None and levels.enter.calls_waiting is not None
    m.telemetry(reading(calls_waiting=levels.enter.calls_waiting), 0.0, 0.0)
    assert m.view.state is S.OVERLOADED
    lost = 1.0
    m.tick(lost + H.telemetry_max_age_s * 3, freeze_telemetry_at=lost)
    assert m.view.state is S.OVERLOADED  # last known-good kept
    m.tick(lost + H.telemetry_max_age_s * 3)
    assert m.view.state is S.UNKNOWN


def flap(m: CentreHealth, period_s: float, duration_s: float, start: float = 0.0) -> list[S]:
    """Answer for half of each period and stay silent for the other half, probing at the
    configured interval; returns every state the machine passed through."""
    states = [m.view.state]
    t = start
    while t < start + duration_s:
        ok = int((t - start) / (period_s / 2)) % 2 == 0
        tr = m.probe_result(TEL, ok, t, "flap")
        tr = m.tick(t) or tr
        if m.view.state is not states[-1]:
            states.append(m.view.state)
        t += H.interval_s
    return states


def test_flapping_is_held_down_within_the_damping_budget() -> None:
    m = machine()
    feed(m, True, -1.0, 1)
    states = flap(m, 2.0, 60.0)
    changes = len(states) - 1
    assert changes <= H.flap_damping.max_transitions + 1, states
    assert states[-1] is S.DOWN and m.held_until is not None
    # steady for the hold: released into recovery; a repeat hold lasts twice as long
    end = 60.0
    t = end
    while m.view.state is S.DOWN and t < end + H.flap_damping.hold_s * 2:
        m.probe_result(TEL, True, t)
        m.tick(t)
        t += H.interval_s
    assert m.view.state is S.RECOVERING
    assert t - end >= H.flap_damping.hold_s
    first_hold = H.flap_damping.hold_s
    flap(m, 2.0, 10.0, start=t)
    assert m.held_until is not None and m.view.state is S.DOWN
    assert m.held_until - t > first_hold  # doubled


def test_override_with_expiry_and_ramp_after_a_declared_down() -> None:
    m = machine()
    feed(m, True, 0.0, 1)
    tr = m.declare(Override(S.DRAINING, "fire drill", "manager:X", 1.0, expires_at=11.0), 1.0)
    assert tr is not None and tr.after is S.DRAINING and tr.source == "manager:X"
    feed(m, True, 2.0, 5)  # evidence keeps flowing underneath
    assert m.tick(10.9) is None and m.view.state is S.DRAINING
    back = m.tick(11.0)
    assert m.override is None
    assert back is not None and back.after is S.RECOVERING  # took no calls: ramps back


def test_next_deadline_is_in_the_future() -> None:
    m = machine("kent", make_config())
    m.telemetry(reading(), 0.0, 0.0)
    d = m.next_deadline(0.0)
    assert d == H.telemetry_max_age_s
    m.tick(d)
    assert m.next_deadline(d) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.01, 5.0)), min_size=1, max_size=200))
def test_never_up_after_a_full_streak_of_failures(results: list[tuple[bool, float]]) -> None:
    """Safety: whatever came before, `unhealthy_threshold` straight failures mean down."""
    m = machine()
    t = 0.0
    streak = 0
    for ok, dt in results:
        t += dt
        m.probe_result(TEL, ok, t)
        m.tick(t)
        streak = 0 if ok else streak + 1
        if streak >= H.unhealthy_threshold:
            assert m.view.state is S.DOWN and not m.view.telephony_up
        assert m.component(Component.CAD) is None
