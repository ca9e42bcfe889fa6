"""One centre's health as a pure, damped state machine: evidence in, `CentreView` out.

No I/O and no clock: every input carries `now` (monotonic seconds), so tests and the failover
bench drive it in virtual time and the live watcher drives it from probes and MQTT.

Evidence per component (telephony, CAD):
- each probe flips down after `unhealthy_threshold` consecutive failures and up after
  `healthy_threshold` consecutive successes (HAProxy `fall`/`rise`); while it is counting
  either way it is on an edge, and `edge_interval` tells the prober to confirm quickly
  (Envoy's `unhealthy_edge_interval`/`healthy_edge_interval`, HAProxy's `fastinter`);
- calls failing at the centre (router/watch/outliers.py) eject it: telephony counts as down
  until the ejection ends, as if its probes had failed;
- fresh telemetry `telephony_up`/`cad_up` counts at once (how a centre reports within 100 ms);
- any "down" wins; a component with no evidence left is unknown, except that a component last
  seen down stays down until something shows it up: stale never silently means healthy.

States: telephony down → `down`; telephony unknown → `unknown`; back up after `down` →
`recovering` for the recovery ramp, then `normal`; fresh telemetry over the `enter` levels →
`overloaded` until under every `leave` level (hysteresis). Flap damping, after Envoy's outlier
ejection: more than `max_transitions` telephony up/down changes within `window_s` hold the
centre down until its evidence has been steady for the hold time, which doubles with each
repeated hold up to `max_hold_s`. A manual declaration overrides all of this until cleared or
expired; evidence keeps being tracked underneath so the state is right the moment it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import KeysView
from dataclasses import dataclass
from enum import StrEnum

from router.config import Centre, Health, OverloadLevels, Probe
from router.engine.model import CentreState, CentreView
from router.watch.telemetry import Telemetry

_DOWN = CentreState.DOWN
_TAKES_NO_CALLS = frozenset({CentreState.DOWN, CentreState.DRAINING})


class Component(StrEnum):
    TELEPHONY = "telephony"
    CAD = "cad"


@dataclass(frozen=True, slots=True)
class Override:
    """A manager's declaration. `expires_at` is on the machine's clock; None = until cleared."""

    state: CentreState
    reason: str
    source: str
    declared_at: float
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of centre state, as audited, published and counted."""

    force: str
    before: CentreState
    after: CentreState
    at: float
    reason: str
    source: str
    detection_s: float | None = None  # first failed evidence → down, when evidence caused it


@dataclass(slots=True)
class _ProbeTrack:
    component: Component
    up: bool | None = None
    fails: int = 0
    oks: int = 0
    first_fail_at: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Verdict:
    up: bool | None
    source: str
    detail: str


def probe_id(probe: Probe) -> str:
    """How a probe is named in logs, status and reasons: `sip 127.0.0.1:5060`."""
    return f"{probe.kind} {probe.target}"


def over_enter(t: Telemetry, levels: OverloadLevels) -> bool:
    """Any `enter` level reached."""
    return ((levels.calls_waiting is not None and t.calls_waiting >= levels.calls_waiting)
            or (levels.oldest_wait_s is not None and t.oldest_wait_s >= levels.oldest_wait_s)
            or (levels.handlers_available_below is not None
                and t.handlers_available < levels.handlers_available_below))


def under_leave(t: Telemetry, levels: OverloadLevels) -> bool:
    """Every `leave` level satisfied."""
    return ((levels.calls_waiting is None or t.calls_waiting <= levels.calls_waiting)
            and (levels.oldest_wait_s is None or t.oldest_wait_s <= levels.oldest_wait_s)
            and (levels.handlers_available_below is None
                 or t.handlers_available >= levels.handlers_available_below))


def _edge(track: _ProbeTrack | None, th: Health) -> float | None:
    """Failing while up, or answering while down: on an edge, to be confirmed quickly."""
    if track is not None and track.fails and track.up is not False:
        return th.unhealthy_edge_interval_s
    if track is not None and track.oks and track.up is False:
        return th.healthy_edge_interval_s
    return None


def _kept(track: _ProbeTrack | None, component: Component) -> _ProbeTrack:
    """A probe's evidence kept over a reload, unless it now watches another component."""
    return track if track is not None and track.component is component \
        else _ProbeTrack(component)


class CentreHealth:
    """The state machine of one centre. Every input returns the `Transition` it caused, if any."""

    def __init__(self, force: str, health: Health, centre: Centre):
        self.force = force
        self._health = health
        self._centre = centre
        self._probes = {probe_id(p): _ProbeTrack(Component(p.component)) for p in centre.probes}
        self._telemetry: Telemetry | None = None
        self._telemetry_at: float | None = None  # when measured, on the machine's clock
        self._frozen_at: float | None = None  # fail static: telemetry ages no further
        self._overloaded = False
        self._memory: dict[Component, bool | None] = {c: None for c in Component}
        self._flaps: deque[float] = deque()
        self._hold_until: float | None = None
        self._hold_s = 0.0
        self._holds = 0
        self._recovering_since: float | None = None
        self._was_down = False
        self._ejected: tuple[float, str] | None = None  # (until, why): calls failing here
        self.override: Override | None = None
        self.state = CentreState.UNKNOWN
        self.since = 0.0
        self.reason = "no evidence yet"
        self.source = "startup"
        self._view = CentreView()

    # ---- inputs -------------------------------------------------------------------------

    def probe_result(self, probe: str, ok: bool, now: float, detail: str = "") -> Transition | None:
        track = self._probes[probe]
        th = self._health
        if ok:
            track.oks, track.fails, track.first_fail_at = track.oks + 1, 0, None
            if track.up is not True and (track.up is None or track.oks >= th.healthy_threshold):
                track.up, track.detail = True, f"{probe}: answered"
        else:
            if track.fails == 0:
                track.first_fail_at = now
            track.fails, track.oks = track.fails + 1, 0
            if track.up is not False and track.fails >= th.unhealthy_threshold:
                track.up = False
                track.detail = f"{probe}: {detail or 'failed'} x{track.fails}"
        return self._settle(now)

    def eject(self, until: float, reason: str, now: float) -> Transition | None:
        """Calls fail here though probes may pass: telephony counts as down until `until`."""
        self._ejected = (until, reason)
        return self._settle(now)

    def edge_interval(self, probe: str) -> float | None:
        """The short interval to probe at while a probe's verdict is being confirmed."""
        return _edge(self._probes.get(probe), self._health)

    def telemetry(self, reading: Telemetry, measured_at: float, now: float) -> Transition | None:
        """A valid reading, `measured_at` already converted to the machine's clock."""
        if self._telemetry_at is not None and measured_at < self._telemetry_at:
            return None  # an older message overtaken by a newer one
        self._telemetry, self._telemetry_at = reading, measured_at
        levels = self._centre.overload
        if levels is not None:
            if not self._overloaded and over_enter(reading, levels.enter):
                self._overloaded = True
            elif self._overloaded and under_leave(reading, levels.leave):
                self._overloaded = False
        return self._settle(now)

    def declare(self, override: Override, now: float) -> Transition | None:
        self.override = override
        return self._settle(now)

    def clear(self, now: float) -> Transition | None:
        ended, self.override = self.override, None
        if ended is not None and ended.state in _TAKES_NO_CALLS:
            self._was_down = True  # it took no calls: traffic comes back by the ramp
        return self._settle(now)

    def tick(self, now: float, *, freeze_telemetry_at: float | None = None) -> Transition | None:
        """Let time pass: expiries of overrides, telemetry, holds and the ramp.

        `freeze_telemetry_at` is the watcher's fail-static mode: telemetry is judged fresh or
        stale as of that moment (the broker's loss), so the last known-good readings stand while
        a reading that was already stale then is not revived."""
        self._frozen_at = freeze_telemetry_at
        if self.override is not None and self.override.expires_at is not None \
                and now >= self.override.expires_at:
            return self.clear(now)
        return self._settle(now)

    def reconfigure(self, health: Health, centre: Centre, now: float) -> Transition | None:
        """New settings after a config reload; evidence of probes that remain is kept."""
        old = self._probes
        self._probes = {probe_id(p): _kept(old.get(probe_id(p)), Component(p.component))
                        for p in centre.probes}
        self._health, self._centre = health, centre
        return self._settle(now)

    # ---- outputs ------------------------------------------------------------------------

    @property
    def view(self) -> CentreView:
        return self._view

    @property
    def probe_ids(self) -> KeysView[str]:
        return self._probes.keys()

    def fresh_telemetry(self, now: float) -> Telemetry | None:
        if self._telemetry is None or self._telemetry_at is None:
            return None
        judged_at = now if self._frozen_at is None else min(now, self._frozen_at)
        if judged_at - self._telemetry_at > self._health.telemetry_max_age_s:
            return None
        return self._telemetry

    def telemetry_age(self, now: float) -> float | None:
        return None if self._telemetry_at is None else now - self._telemetry_at

    @property
    def last_telemetry(self) -> Telemetry | None:
        return self._telemetry

    def component(self, component: Component) -> bool | None:
        return self._memory[component]

    @property
    def held_until(self) -> float | None:
        return self._hold_until

    def next_deadline(self, now: float) -> float | None:
        """The next moment `tick` could change something, so the owner can sleep until then."""
        moments = [self._hold_until, self._ejected[0] if self._ejected else None]
        if self.override is not None:
            moments.append(self.override.expires_at)
        if self._telemetry_at is not None and self._frozen_at is None:
            moments.append(self._telemetry_at + self._health.telemetry_max_age_s)
        if self._recovering_since is not None:
            moments.append(self._recovering_since + self._ramp_s)
        if self._flaps:
            moments.append(self._flaps[0] + self._health.flap_damping.window_s)
        return min((m for m in moments if m is not None and m > now), default=None)

    # ---- derivation ---------------------------------------------------------------------

    @property
    def _ramp_s(self) -> float:
        rec = self._health.recovery
        return (len(rec.ramp) - 1) * rec.step_s

    def _verdict(self, component: Component, now: float) -> _Verdict:
        down: list[_Verdict] = []
        up: list[_Verdict] = []
        for track in self._probes.values():
            if track.component is component and track.up is not None:
                (up if track.up else down).append(_Verdict(track.up, "probe", track.detail))
        if component is Component.TELEPHONY and self._ejected and now < self._ejected[0]:
            down.append(_Verdict(False, "outlier", self._ejected[1]))
        t = self.fresh_telemetry(now)
        if t is not None and self._centre.telemetry:
            flag = t.telephony_up if component is Component.TELEPHONY else t.cad_up
            (up if flag else down).append(
                _Verdict(flag, "telemetry", f"telemetry {component.value}_up={str(flag).lower()}"))
        if down:
            return down[0]
        if up:
            return up[0]
        if self._memory[component] is False:
            return _Verdict(False, "evidence",
                            f"{component.value} last seen down; no evidence since")
        return _Verdict(None, "evidence", f"no current evidence of {component.value}")

    def _damp(self, telephony: bool | None, now: float) -> None:
        fd = self._health.flap_damping
        while self._flaps and self._flaps[0] <= now - fd.window_s:
            self._flaps.popleft()
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_until = None  # steady for the whole hold: released
        last = self._memory[Component.TELEPHONY]
        if telephony is None or last is None or telephony == last:
            if self._hold_until is None and not self._flaps:
                self._holds = 0  # a whole quiet window: forgive earlier holds
            return
        self._flaps.append(now)
        if self._hold_until is not None:  # still flapping while held: restart the steady clock
            self._hold_until = now + self._hold_s
        elif len(self._flaps) > fd.max_transitions:
            self._hold_s = min(fd.hold_s * 2 ** self._holds, fd.max_hold_s)
            self._holds += 1
            self._hold_until = now + self._hold_s

    def _automatic(self, now: float) -> tuple[CentreState, str, str]:
        tel = self._verdict(Component.TELEPHONY, now)
        cad = self._verdict(Component.CAD, now)
        self._damp(tel.up, now)
        self._memory[Component.TELEPHONY], self._memory[Component.CAD] = tel.up, cad.up
        fd = self._health.flap_damping
        if self._hold_until is not None:
            return (_DOWN, f"flap damping: {len(self._flaps)} up/down changes within "
                    f"{fd.window_s:g}s; held until steady for {self._hold_s:g}s", "flap_damping")
        if tel.up is False:
            return _DOWN, tel.detail, tel.source
        if tel.up is None:
            return CentreState.UNKNOWN, tel.detail, tel.source
        ramped = False
        if self._recovering_since is not None and now >= self._recovering_since + self._ramp_s:
            self._recovering_since, ramped = None, True
        if self._recovering_since is not None:
            return CentreState.RECOVERING, "back after down: ramping traffic up", "recovery"
        if self._overloaded and self.fresh_telemetry(now) is not None:
            return CentreState.OVERLOADED, "telemetry over the overload enter levels", "telemetry"
        if ramped:
            return CentreState.NORMAL, "recovery ramp complete", "recovery"
        return CentreState.NORMAL, tel.detail, tel.source

    def _settle(self, now: float) -> Transition | None:
        state, reason, source = self._automatic(now)
        if state is _DOWN:
            self._was_down, self._recovering_since = True, None
        elif state in (CentreState.NORMAL, CentreState.OVERLOADED) and self._was_down:
            self._was_down, self._recovering_since = False, now
            state, reason, source = (CentreState.RECOVERING, "back after down: ramping traffic up",
                                     source)
        elif state is CentreState.NORMAL:
            self._recovering_since = None
        if self.override is not None:
            o = self.override
            state, reason, source = o.state, o.reason, o.source
        changed = state is not self.state
        t = self.fresh_telemetry(now)
        self._view = CentreView(
            state=state,
            telephony_up=self._memory[Component.TELEPHONY] is not False,
            cad_up=self._memory[Component.CAD] is not False,
            since=now if changed else self.since,
            calls_waiting=t.calls_waiting if t is not None else None,
            declared=self.override is not None,
        )
        if not changed:
            return None
        before = self.state
        detection = None
        if state is _DOWN and self.override is None:
            fails = [tr.first_fail_at for tr in self._probes.values()
                     if tr.up is False and tr.first_fail_at is not None]
            if source == "probe" and fails:
                detection = now - min(fails)
            elif source == "telemetry" and self._telemetry_at is not None:
                detection = max(now - self._telemetry_at, 0.0)  # measured → declared
        self.state, self.since, self.reason, self.source = state, now, reason, source
        return Transition(self.force, before, state, now, reason, source, detection)
