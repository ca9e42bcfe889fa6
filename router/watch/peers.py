"""Several routers, one set of mutual-aid caps: each tells the others its calls in flight over
MQTT and counts theirs in.

Routers run active-active on one broker (Kamailio asks one and falls back to another; a load
balancer may spread calls over all). Each ledger counts only the calls its router routed, so
alone each would give a partner its whole cap. Here each router publishes its counts, retained,
on `overflow/instances/{instance}/load` within DEBOUNCE_S of a change and every HEARTBEAT_S
anyway, and sets the others' latest, summed, as its ledger's `peers`: the engine decides on
own + peers. Routing never waits on this; without a broker the last counts stand, under the
rule for silent routers.

Error bound: a router admits a call only while its own count plus the others' last published
counts is under the cap, and those lag the truth by at most W = DEBOUNCE_S + TICK_S + delivery
(the link's queue and the broker). So a partner's aid exceeds its cap by at most the calls the
*other* routers admitted to it within the last W (and never by more than without sharing,
(N-1) x cap); calls spaced more than W apart never exceed it.

A silent router (no message for HOLD_S, three heartbeats; or one that said it stopped, at
once) is gone or cut off, but its calls are real calls at partners' centres whose end no
router will hear. They are counted in full for HOLD_S, then down in a straight line to none
over DECAY_S (at most `max_call_duration_s`, when their own router would have expired them),
each count rounded up. With the scenarios' handling times (999: lognormal, mean 270 s; 101:
mean 360 s), calls in flight at an instant have a convex survival curve, under 1% of 999s
(5% of 101s) still going after 900 s: the line stays above it but for that remainder.

Ends: Kamailio tells a call's end to the first router that answers, not always the one that
routed it, so each router passes every end on (`overflow/instances/{instance}/ended`) and the
one holding the call frees it.

Restart: a router keeps its name across restarts with OVERFLOW_INSTANCE (router.infra.instance).
At start it reads its previous life's retained message and counts those calls (`recalled`) by
the same rule from that message's time, and publishes them with its own so the others do too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.engine.calls import CallDesk
from router.engine.ledger import Counts
from router.engine.model import Service
from router.infra import metrics
from router.infra.listeners import Unsubscribe
from router.infra.mqtt_link import MqttLink

log = logging.getLogger(__name__)

PATTERN = "instances/+/load"
ENDED = "instances/+/ended"  # calls ended by telephony, for whichever router holds them
DEBOUNCE_S = 0.05  # a change is published within this (the bound's main term)
HEARTBEAT_S = 1.0  # and the counts at least this often, changed or not
TICK_S = 0.02  # how often own counts are compared with the last published
HOLD_S = 3.0  # silent this long (three heartbeats): gone or cut off
DECAY_S = 900.0  # then its calls are counted down to none over this
CLOSE_WAIT_S = 1.0  # at a clean stop, for the last message to leave
MAX_COUNT = 1_000_000  # a count past this is a malformed message, not a region's calls


def segment(instance: str) -> str:
    """An instance's name as one topic level: characters MQTT gives a meaning are replaced."""
    return instance.replace("/", "_").replace("+", "_").replace("#", "_")


def topic(instance: str) -> str:
    return f"instances/{segment(instance)}/load"


def remaining(age: float, hold_s: float, decay_s: float) -> float:
    """The share of a silent router's calls still counted `age` s after its last message."""
    if age <= hold_s:
        return 1.0
    return max(0.0, 1.0 - (age - hold_s) / decay_s) if decay_s > 0 else 0.0


def encode(counts: Counts) -> dict[str, Any]:
    nested: dict[str, dict[str, int]] = {}
    for (partner, origin), n in counts.aid_from.items():
        nested.setdefault(partner, {})[origin] = n
    services: dict[str, dict[str, int]] = {}
    for (force, service), n in counts.by_service.items():
        services.setdefault(force, {})[service.value] = n
    return {"in_flight": dict(counts.in_flight), "aid": dict(counts.aid), "aid_from": nested,
            "by_service": services}


def decode(wire: Any) -> Counts:
    """The counts a message carries; ValueError for any other shape."""
    if not isinstance(wire, dict):
        raise ValueError("counts must be an object")

    def flat(value: Any) -> dict[str, int]:
        if not isinstance(value, dict):
            raise ValueError("a count table must be an object")
        for key, n in value.items():
            if not isinstance(key, str) or type(n) is not int or not 0 <= n <= MAX_COUNT:
                raise ValueError(f"bad count {key!r}: {n!r}")
        return {k: n for k, n in value.items() if n}

    aid_from = {(partner, origin): n for partner, inner in _tables(wire, "aid_from", flat)
                for origin, n in inner.items()}
    by_service = {(force, Service(s)): n for force, inner in _tables(wire, "by_service", flat)
                  for s, n in inner.items()}
    return Counts(flat(wire.get("in_flight", {})), flat(wire.get("aid", {})), aid_from,
                  by_service)


def _tables(wire: dict[str, Any], key: str,
                flat: Callable[[Any], dict[str, int]]) -> list[tuple[str, dict[str, int]]]:
    tables = wire.get(key, {})
    if not isinstance(tables, dict):
        raise ValueError(f"{key} must be an object")
    return [(str(outer), flat(inner)) for outer, inner in tables.items()]


@dataclass(frozen=True, slots=True)
class Heard:
    """One router's last message."""

    boot: str  # which life of the router
    seq: int
    counts: Counts
    at: float  # monotonic time they were true: receipt, or back-dated by the message's age
    final: bool  # it said it stopped: counted down at once, no hold

    def share(self, now: float, hold_s: float, decay_s: float) -> float:
        return remaining(now - self.at, 0.0 if self.final else hold_s, decay_s)


class PeerBook:
    """The other routers' latest counts and this router's previous life's. Pure: the clocks
    are passed in (monotonic `now` for ages, `wall` only to age a message when first heard)."""

    def __init__(self, instance: str, boot: str, started_wall: float, *,
                 hold_s: float = HOLD_S, decay_s: float = DECAY_S):
        self.instance, self.boot, self.started_wall = instance, boot, started_wall
        self.hold_s, self.decay_s = hold_s, decay_s
        self.peers: dict[str, Heard] = {}
        self.recalled: Heard | None = None
        self.twin = False  # another live router publishes under this router's name

    def hear(self, instance: str, message: Mapping[str, Any] | None, now: float,
             wall: float) -> bool:
        """Take one message (None: the topic was cleared, a clean stop with no calls). True
        if what is counted changed. ValueError/KeyError/TypeError for a malformed one."""
        if instance == self.instance:
            return self._hear_own(message, now, wall)
        if message is None:
            return self.peers.pop(instance, None) is not None
        heard = _heard(message, self.peers.get(instance), now, wall)
        if heard is None:
            return False
        self.peers[instance] = heard
        return True

    def _hear_own(self, message: Mapping[str, Any] | None, now: float, wall: float) -> bool:
        """Our previous life's last message, once: read at start, before we publish."""
        boot = None if message is None else message.get("boot")
        if message is None or boot == self.boot:
            return False  # our own words, echoed
        if self.recalled is not None and boot == self.recalled.boot:
            return False  # redelivered after a reconnection
        if float(message["at"]) > self.started_wall or self.recalled is not None:
            if not self.twin:
                log.error("another router publishes as %r: give each its own "
                          "OVERFLOW_INSTANCE; its counts are ignored", self.instance)
            self.twin = True
            return False
        recalled = self.recalled = _heard(message, None, now, wall)
        if recalled is not None:
            log.info("counting %d calls in flight before this router's restart (%d of them "
                     "aid), down to none within %.0f s", sum(recalled.counts.in_flight.values()),
                     sum(recalled.counts.aid.values()), self.hold_s + self.decay_s)
        return True

    def recalled_counts(self, now: float) -> Counts:
        """This router's calls from before its restart still counted now (it publishes them)."""
        if self.recalled is None:
            return Counts()
        return self.recalled.counts.scaled(self.recalled.share(now, self.hold_s, self.decay_s))

    def summary(self, now: float) -> Counts:
        """What the ledger counts besides its own: the others' calls and the recalled."""
        return Counts.sum([*(h.counts.scaled(h.share(now, self.hold_s, self.decay_s))
                             for h in self.peers.values()), self.recalled_counts(now)])

    def live(self, now: float) -> tuple[int, int]:
        """Routers heard within HOLD_S, and silent ones still counted."""
        fresh = sum(1 for h in self.peers.values() if not h.final and now - h.at <= self.hold_s)
        return fresh, len(self.peers) - fresh

    def forget(self, now: float) -> list[str]:
        """Drop routers whose calls are all counted down; returns their names."""
        gone = [i for i, h in self.peers.items() if h.share(now, self.hold_s, self.decay_s) <= 0]
        for instance in gone:
            del self.peers[instance]
        if self.recalled is not None and \
                self.recalled.share(now, self.hold_s, self.decay_s) <= 0:
            self.recalled = None
        return gone


def _heard(message: Mapping[str, Any], before: Heard | None, now: float,
           wall: float) -> Heard | None:
    boot, seq, at = str(message["boot"]), int(message["seq"]), float(message["at"])
    if not math.isfinite(at):
        raise ValueError("at must be a finite time")
    counts = decode(message["counts"])
    if before is not None and before.boot == boot:
        if seq <= before.seq:
            return None  # redelivered (retained, after a reconnection): nothing new
        when = now  # a router we hear live: its counts are true now, whatever its clock says
    else:
        when = now - max(wall - at, 0.0)  # first heard, maybe retained long ago: its age
    return Heard(boot, seq, counts, when, bool(message.get("final", False)))


class Peers:
    """Publishes this router's counts and feeds the others' into the call desk's ledger."""

    def __init__(self, calls: CallDesk, mqtt: MqttLink, instance: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self._calls = calls
        self._mqtt = mqtt
        self._clock, self._wall = clock, wall_clock
        self.instance = instance
        self.topic = topic(instance)
        self.book = PeerBook(segment(instance), uuid.uuid4().hex[:12], wall_clock())
        self._seq = 0
        self._sent: Counts | None = None
        self._sent_at = -math.inf
        self._bad: set[str] = set()  # routers whose malformed message was logged
        # before the link connects: the broker then sends our previous life's retained message
        # before it takes our first publication (one client's packets are handled in order)
        self._unsubscribe: list[Unsubscribe] = [mqtt.subscribe(PATTERN, self._on_message),
                                                mqtt.subscribe(ENDED, self._on_ended)]
        calls.on_end = self._pass_on

    def _pass_on(self, call_id: str) -> None:
        """A call's end, to the others (Kamailio tells the first router that answers, which
        may not be the one that routed the call). Only while other routers are heard of."""
        if self.book.peers:
            # QoS 0 like the counts: the link sends QoS 1 one acknowledgement at a time, and
            # these must not wait behind each other (the bound's W); TCP loses none while up
            self._mqtt.publish(f"instances/{self.book.instance}/ended", {"call_id": call_id})

    def _on_ended(self, topic_name: str, payload: bytes) -> None:
        if topic_name.split("/")[1] == self.book.instance:
            return
        try:
            call_id = json.loads(payload)["call_id"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(call_id, str):
            self._calls.finish(call_id, passed_on=True)

    def _on_message(self, topic_name: str, payload: bytes) -> None:
        instance = topic_name.split("/", 1)[1].rsplit("/", 1)[0]
        try:
            message = json.loads(payload) if payload else None
            if message is not None and not isinstance(message, dict):
                raise ValueError("not an object")
            changed = self.book.hear(instance, message, self._clock(), self._wall())
        except (ValueError, KeyError, TypeError) as exc:
            if instance not in self._bad:
                self._bad.add(instance)
                log.warning("ignoring a malformed load message from router %r: %s", instance, exc)
            return
        if changed:
            self.apply()

    def apply(self) -> None:
        """Set the ledger's peers from what was heard, counted down as of now."""
        now = self._clock()
        self.book.decay_s = min(DECAY_S, self._calls.max_call_duration_s)
        peers = self.book.summary(now)
        self._calls.ledger.peers = peers
        live, silent = self.book.live(now)
        metrics.child(metrics.PEER_INSTANCES, "live").set(live)
        metrics.child(metrics.PEER_INSTANCES, "silent").set(silent)
        for force in self._calls.policy.config.forces:
            metrics.child(metrics.PEER_AID_IN_FLIGHT, force).set(peers.aid.get(force, 0))

    def counts(self) -> Counts:
        """What this router tells the others: its calls, and the recalled ones."""
        own = self._calls.ledger.own()
        if self.book.recalled is None:
            return own
        return Counts.sum([own, self.book.recalled_counts(self._clock())])

    async def run(self) -> None:
        """Until cancelled: publish on change (debounced) and every heartbeat; count silent
        routers down and forget those with none left."""
        refreshed = -math.inf
        while True:
            now = self._clock()
            if self._mqtt.connected:  # queued while away, they would only be stale on arrival
                self.publish_if_due(now)
            if now - refreshed >= HEARTBEAT_S:
                refreshed = now
                for gone in self.book.forget(now):  # their retained message too
                    self._mqtt.publish(topic(gone), None, retain=True)
                self.apply()
            await asyncio.sleep(TICK_S)

    def publish_if_due(self, now: float) -> None:
        counts = self.counts()
        since = now - self._sent_at
        if since >= HEARTBEAT_S or (counts != self._sent and since >= DEBOUNCE_S):
            self._send(counts, now, final=False)

    def _send(self, counts: Counts, now: float, *, final: bool) -> None:
        self._seq += 1
        self._mqtt.publish(self.topic, {
            "instance": self.instance, "boot": self.book.boot, "seq": self._seq,
            "at": self._wall(), "final": final, "counts": encode(counts)}, retain=True)
        self._sent, self._sent_at = counts, now

    async def close(self) -> None:
        """A clean stop: the others count this router's calls down at once (or forget it if it
        carries none), and the message is given CLOSE_WAIT_S to leave."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._calls.on_end == self._pass_on:
            self._calls.on_end = None
        counts = self.counts()
        if counts:
            self._send(counts, self._clock(), final=True)
        else:
            self._mqtt.publish(self.topic, None, retain=True)
        for _ in range(int(CLOSE_WAIT_S / TICK_S)):  # the link has no flush to await
            if not (self._mqtt.connected and self._mqtt.pending):
                break
            await asyncio.sleep(TICK_S)
