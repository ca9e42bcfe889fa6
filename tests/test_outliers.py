"""Passive health (grey failures), fast confirmation edges and the steady epoch clock: the pure
parts in virtual time, then the whole path over HTTP — Kamailio's end-of-call report ejects
a centre whose probes still pass."""

from __future__ import annotations

from pathlib import Path

from fault_support import metric
from health_support import make_config
from service_support import make_config as service_config
from service_support import running_service

from router.config import OutlierDetection
from router.engine.model import CentreState
from router.infra.clock import SteadyWall
from router.watch.health import CentreHealth
from router.watch.outliers import Outcome, Outliers, outcome_of

SIP = {"kind": "sip", "target": "127.0.0.1:5060", "component": "telephony"}
PID = "sip 127.0.0.1:5060"


def test_consecutive_failures_eject_and_the_ejection_grows() -> None:
    o = Outliers(OutlierDetection(consecutive_failures=3, base_ejection_time_s=10,
                                  max_ejection_time_s=25))
    assert [o.record("met", Outcome.FAILED, t, 8) for t in (0.0, 1.0)] == [None, None]
    first = o.record("met", Outcome.FAILED, 2.0, 8)
    assert first is not None and first.until == 12.0 and "3 calls in a row" in first.reason
    assert o.record("met", Outcome.FAILED, 5.0, 8) is None  # ejected: placed before, ignored
    for t in (13.0, 14.0):
        assert o.record("met", Outcome.FAILED, t, 8) is None
    second = o.record("met", Outcome.FAILED, 15.0, 8)
    assert second is not None and second.until == 35.0 and second.number == 2
    for t in (36.0, 37.0):
        o.record("met", Outcome.FAILED, t, 8)
    third = o.record("met", Outcome.FAILED, 38.0, 8)
    assert third is not None and third.until == 38.0 + 25  # capped at max_ejection_time_s


def test_a_success_resets_the_run_and_cancelled_calls_say_nothing() -> None:
    o = Outliers(OutlierDetection(consecutive_failures=3, failure_percentage_request_volume=100))
    for outcome in (Outcome.FAILED, Outcome.FAILED, Outcome.ANSWERED, Outcome.FAILED,
                    Outcome.CANCELLED, Outcome.FAILED):
        assert o.record("met", outcome, 1.0, 8) is None


def test_failure_percentage_over_the_window() -> None:
    o = Outliers(OutlierDetection(consecutive_failures=100, interval_s=10,
                                  failure_percentage_threshold=50,
                                  failure_percentage_request_volume=8))
    outcomes = [Outcome.FAILED, Outcome.FAILED, Outcome.FAILED, Outcome.ANSWERED] * 2
    results = [o.record("met", x, i * 0.5, 8) for i, x in enumerate(outcomes)]
    assert results[:-1] == [None] * 7 and results[-1] is not None
    assert "6 of 8 calls failed" in results[-1].reason
    # the same calls spread beyond the window never reach the volume
    slow = Outliers(o.settings)
    assert all(slow.record("kent", x, i * 5.0, 8) is None for i, x in enumerate(outcomes))


def test_max_ejection_percent_keeps_enough_centres_but_always_allows_one() -> None:
    o = Outliers(OutlierDetection(consecutive_failures=1, max_ejection_percent=25))
    assert o.record("met", Outcome.FAILED, 0.0, 8) is not None
    assert o.record("kent", Outcome.FAILED, 0.0, 8) is not None  # 25 % of 8 = 2
    assert o.record("surrey", Outcome.FAILED, 0.0, 8) is None and o.capped == 1
    none = Outliers(OutlierDetection(consecutive_failures=1, max_ejection_percent=0))
    assert none.record("met", Outcome.FAILED, 0.0, 2) is not None  # at least one, as Envoy


def test_outcome_from_sip_codes() -> None:
    assert [outcome_of(None, c) for c in (200, 486, 503, 408, 480, 487, 180)] == [
        Outcome.ANSWERED, Outcome.FAILED, Outcome.FAILED, Outcome.NO_ANSWER,
        Outcome.NO_ANSWER, Outcome.CANCELLED, None]
    assert outcome_of("answered", 503) is Outcome.ANSWERED and outcome_of(None, None) is None


def test_an_ejection_takes_the_centre_down_and_it_comes_back_by_the_ramp() -> None:
    cfg = make_config(probes={"met": [SIP]})
    m = CentreHealth("met", cfg.health, cfg.forces["met"].centre)
    m.probe_result(PID, True, 0.0)
    assert m.state is CentreState.NORMAL
    t = m.eject(31.0, "outlier: 5 calls in a row failed", 1.0)
    assert t is not None and t.after is CentreState.DOWN and t.source == "outlier"
    m.probe_result(PID, True, 2.0)  # OPTIONS still answered: still ejected
    assert m.state is CentreState.DOWN and m.next_deadline(2.0) == 31.0
    m.tick(31.0)
    assert m.state is CentreState.RECOVERING


def test_edges_ask_for_fast_confirmation_both_ways() -> None:
    cfg = make_config({"unhealthy_edge_interval_s": 0.03, "healthy_edge_interval_s": 0.05},
                      probes={"met": [SIP]})
    m = CentreHealth("met", cfg.health, cfg.forces["met"].centre)
    m.probe_result(PID, True, 0.0)
    assert m.edge_interval(PID) is None
    m.probe_result(PID, False, 1.0)
    assert m.edge_interval(PID) == 0.03  # up, counting failures
    m.probe_result(PID, False, 1.03)
    m.probe_result(PID, False, 1.06)
    assert m.state is CentreState.DOWN and m.edge_interval(PID) is None  # confirmed: settled
    m.probe_result(PID, True, 2.0)
    assert m.edge_interval(PID) == 0.05  # down, counting successes
    off = make_config({"unhealthy_edge_interval_s": None}, probes={"met": [SIP]})
    m2 = CentreHealth("met", off.health, off.forces["met"].centre)
    m2.probe_result(PID, True, 0.0)
    m2.probe_result(PID, False, 1.0)
    assert m2.edge_interval(PID) is None


def test_the_steady_epoch_clock_slews_instead_of_stepping() -> None:
    wall, mono = [1_000_000.0], [50.0]
    clock = SteadyWall(lambda: wall[0], lambda: mono[0], max_slew=0.01)
    start = clock()
    assert start == 1_000_000.0
    wall[0] += 3600  # NTP steps the wall clock an hour forward
    mono[0] += 60.0
    wall[0] += 60.0
    assert abs(clock() - (start + 60.0)) <= 0.6  # 60 s passed, give or take 1 %
    wall[0] -= 7200  # and two hours back
    mono[0] += 10.0
    wall[0] += 10.0
    assert abs(clock() - (start + 70.0)) <= 0.7


async def test_calls_failing_at_a_centre_over_http_eject_it(tmp_path: Path) -> None:
    """The contract's end of call, with and without a body; failed outcomes eject the centre
    the call was sent to, audited and counted, and new 999 calls go elsewhere."""
    async with running_service(service_config(tmp_path)) as api:
        for force in api.service.config.forces:  # the Met on its own evidence (none yet)
            if force != "met":
                await api.call("PUT", f"/v1/forces/{force}/override", "manager",
                               json={"state": "normal", "reason": "test"})
        status, _ = await api.call("POST", "/v1/calls/nobody/end", "telephony")
        assert status == 204  # empty body: still the contract's call end
        status, body = await api.call("POST", "/v1/calls/x/end", "telephony",
                                      json={"outcome": "exploded"})
        assert status == 400 and body["field"] == "outcome"
        _, text = await api.call("GET", "/metrics")
        before = (metric(text, "overflow_outlier_ejections_total", force="met"),
                  metric(text, "overflow_call_outcomes_total", destination="met",
                         outcome="failed"))
        sent = []
        for n in range(10):
            status, decision = await api.call("POST", "/v1/route", "telephony", json={
                "call_id": f"grey-{n}", "service": "999", "origin": "met"})
            assert status == 200
            sent.append(decision["destination"])
            if decision["destination"] != "met":
                break
            status, _ = await api.call("POST", f"/v1/calls/grey-{n}/end", "telephony",
                                       json={"outcome": "failed", "sip_code": 503})
            assert status == 204
        assert sent == ["met"] * 5 + [sent[-1]] and sent[-1] != "met"
        status, forces = await api.call("GET", "/v1/forces", "viewer")
        assert forces["forces"]["met"]["state"] == "down"
        status, text = await api.call("GET", "/metrics")
        after = (metric(text, "overflow_outlier_ejections_total", force="met"),
                 metric(text, "overflow_call_outcomes_total", destination="met",
                        outcome="failed"))
        assert (after[0] - before[0], after[1] - before[1]) == (1, 5)  # process-wide counters
