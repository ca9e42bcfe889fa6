"""Properties of the decision engine over random configs, centre states, loads and call
sequences (hypothesis): what must hold for every input, not just the examples in test_policy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from configs.builder import config, force
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import RouterConfig
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Decision, Reason, Service, Snapshot
from router.engine.policy import Policy

IDS = ("aa", "bb", "cc", "dd", "ee", "ff")
AID_REASONS = frozenset({Reason.ORIGIN_DOWN, Reason.ORIGIN_OVERLOADED, Reason.ORIGIN_DRAINING,
                         Reason.ORIGIN_RECOVERING, Reason.ORIGIN_CAD_DOWN})
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routes(draw: st.DrawFn, origin: str, others: list[str]) -> list[tuple[Any, ...]]:
    partners = draw(st.lists(st.sampled_from(others), min_size=1, max_size=len(others),
                             unique=True))
    out: list[tuple[Any, ...]] = []
    for to in partners:
        weight = draw(st.integers(0, 5))
        cap = draw(st.none() | st.integers(0, 4))
        out.append((to, weight) if cap is None else (to, weight, cap))
    if sum(r[1] for r in out) == 0:  # the validator refuses all-zero weights
        out[0] = (out[0][0], 1, *out[0][2:])
    return out


@st.composite
def configs(draw: st.DrawFn) -> RouterConfig:
    ids = list(IDS[:draw(st.integers(2, len(IDS)))])
    forces = []
    for fid in ids:
        others = [o for o in ids if o != fid]
        max_queue = draw(st.integers(0, 10))
        aid_max = draw(st.integers(0, 8))
        forces.append(force(
            fid, handlers=draw(st.integers(0, 20)), max_queue=max_queue,
            overflow_queue=draw(st.integers(0, max_queue)), aid_max=aid_max,
            reserve_999=draw(st.integers(0, aid_max)), aid_queue_below=draw(st.integers(0, 10)),
            on_cad_down=draw(st.sampled_from(["keep", "overflow"])),
            routes_999=draw(routes(fid, others)), routes_101=draw(routes(fid, others)),
        ))
    return config(*forces, step_s=draw(st.sampled_from([1.0, 30.0])))


@dataclass(frozen=True)
class World:
    cfg: RouterConfig
    snapshot: Snapshot
    preload: dict[str, int]
    now: float
    ops: list[tuple[str, Service, int]]  # ("call", service, origin index) or ("end", _, index)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    cfg = draw(configs())
    # weighted towards healthy partners, so that caps and reserves are actually reached
    mostly_up = st.sampled_from([True, True, True, False])
    views = {fid: CentreView(
        state=draw(st.sampled_from([CentreState.NORMAL] * 4 + list(CentreState))),
        telephony_up=draw(mostly_up), cad_up=draw(mostly_up), since=draw(st.floats(0, 200)),
        calls_waiting=draw(st.none() | st.none() | st.integers(0, 30)),
    ) for fid in cfg.forces}
    preload = {fid: draw(st.integers(0, 25)) for fid in cfg.forces}
    ops = draw(st.lists(st.tuples(st.sampled_from(["call", "call", "call", "end"]),
                                  st.sampled_from(list(Service)), st.integers(0, 1000)),
                        min_size=1, max_size=120))
    return World(cfg, Snapshot(views), preload, draw(st.floats(0, 300)), ops)


def replay(world: World, check: bool) -> list[Decision]:
    """Run the world's operations; with `check`, assert every rule at every decision."""
    cfg, snapshot = world.cfg, world.snapshot
    policy, ledger = Policy(cfg), Ledger()
    for fid, n in world.preload.items():
        ledger.preload(fid, n)
    ids = list(cfg.forces)
    decisions: list[Decision] = []
    ruled_aid: Counter[tuple[str, Service]] = Counter()  # aid given under the rules
    for n, (op, service, index) in enumerate(world.ops):
        if op == "end":
            if ledger.calls:
                call_id = list(ledger.calls)[index % len(ledger.calls)]
                call = ledger.end(call_id)
                if call is not None and call_id.startswith("ruled"):
                    ruled_aid[(call.destination, call.service)] -= 1
            continue
        origin = ids[index % len(ids)]
        d = policy.decide(service, origin, snapshot, ledger, world.now)
        decisions.append(d)
        if check:
            check_decision(cfg, snapshot, ledger, d)
        ruled = d.reason in AID_REASONS and d.is_aid
        call_id = f"{'ruled' if ruled else 'other'}-{n}"
        ledger.add(call_id, d, world.now)
        if ruled:
            ruled_aid[(d.destination, d.service)] += 1
        if check:  # caps hold for aid given under the rules; only last_resort goes beyond
            for fid, f in cfg.forces.items():
                given_999 = ruled_aid[(fid, Service.EMERGENCY)]
                given_101 = ruled_aid[(fid, Service.NON_EMERGENCY)]
                assert given_999 + given_101 <= f.mutual_aid.max_concurrent
                assert given_101 <= f.mutual_aid.max_concurrent - f.mutual_aid.reserve_999
    return decisions


def check_decision(cfg: RouterConfig, snapshot: Snapshot, ledger: Ledger, d: Decision) -> None:
    home = cfg.forces[d.origin]
    assert d.destination in cfg.forces
    if d.service is Service.EMERGENCY:
        # a 999 always gets a real destination: never shed, always a SIP URI of a force
        assert d.reason is not Reason.SHED
        assert d.sip_uri == cfg.forces[d.destination].sip[d.service]
    else:
        assert d.reason is not Reason.LAST_RESORT
    if d.reason is Reason.SHED:
        assert d.destination == d.origin
        shed = home.centre.shed_101
        assert (d.action, d.sip_uri) in {("queue", shed.queue),
                                         ("announcement", shed.announcement)}
        return
    assert d.sip_uri == cfg.forces[d.destination].sip[d.service]
    if d.reason is Reason.HOME:
        assert d.destination == d.origin
        origin_view = snapshot.get(d.origin)
        assert origin_view.state not in (CentreState.DOWN, CentreState.DRAINING)
        assert origin_view.telephony_up
    if d.reason in AID_REASONS and d.is_aid:
        # decided against the ledger as it was before this call was added
        route = next(r for r in home.overflow[d.service] if r.to == d.destination)
        view = snapshot.get(d.destination)
        assert view.state is CentreState.NORMAL and view.telephony_up and view.cad_up
        aid = cfg.forces[d.destination].mutual_aid
        limit = aid.max_concurrent - (aid.reserve_999 if d.service is Service.NON_EMERGENCY
                                      else 0)
        assert ledger.aid[d.destination] < limit  # 101 never reaches into the 999 reserve
        if route.max_concurrent is not None:
            assert ledger.aid_from[(d.destination, d.origin)] < route.max_concurrent


@SETTINGS
@given(worlds())
def test_every_decision_keeps_the_rules(world: World) -> None:
    replay(world, check=True)


@SETTINGS
@given(worlds())
def test_same_inputs_give_the_same_decisions(world: World) -> None:
    assert replay(world, check=False) == replay(world, check=False)


@SETTINGS
@given(configs(), st.integers(0, 5))
def test_a_999_always_gets_a_destination_whatever_the_states(cfg: RouterConfig,
                                                              which: int) -> None:
    origin = list(cfg.forces)[which % len(cfg.forces)]
    for state in CentreState:
        everyone = Snapshot({fid: CentreView(state, telephony_up=False, cad_up=False)
                             for fid in cfg.forces})
        d = Policy(cfg).decide(Service.EMERGENCY, origin, everyone, Ledger(), 0.0)
        assert d.destination in cfg.forces and d.sip_uri.startswith("sip")


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(1, 400))
def test_shares_follow_weights_within_one_call(weights: list[int], calls: int) -> None:
    partners = IDS[1:1 + len(weights)]
    spec = list(zip(partners, weights, strict=True))
    cfg = config(force("aa", routes_999=spec, routes_101=spec),
                 *(force(p, aid_max=calls, aid_queue_below=calls, routes_999=[("aa", 1)],
                         routes_101=[("aa", 1)]) for p in partners))
    policy, ledger = Policy(cfg), Ledger()
    down = Snapshot({"aa": CentreView(CentreState.DOWN),
                     **{p: CentreView(CentreState.NORMAL) for p in partners}})
    counts: Counter[str] = Counter()
    for _ in range(calls):
        counts[policy.decide(Service.EMERGENCY, "aa", down, ledger, 0.0).destination] += 1
    total = sum(weights)
    for partner, weight in spec:
        assert abs(counts[partner] - calls * weight / total) <= 1
