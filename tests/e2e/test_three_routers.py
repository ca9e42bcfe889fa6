"""Three routers, one PostgreSQL, one Mosquitto and a real Kamailio: what a site with several
instances must keep doing while one of them dies and another restarts (issue #10).

Three `python -m router run` processes (`OVERFLOW_INSTANCE` r1, r2, r3) share one PostgreSQL
database as `handoff.store` (handoffs, declarations and shared operational state) and one
private Mosquitto. Kamailio asks r1, then r3, then r2 for every call; sipp places the Met's
999 calls and sipp centres answer them. Kent and Surrey hand incidents to the Met through
`POST /v1/handoffs`, spread over the three routers and retried on the next router when one
does not answer (as a partner's CAD would); the Met's CAD is a real HTTP server (the
`http_json` adapter's EIDO peer) that records every delivery with its idempotency key.

The run: a manager declares the Met down on r2; a burst of handoffs lands on r1, the leader,
and r1 is SIGKILLed while its CAD deliveries are still queued; Kent's centre then fails for
real (phones and CAD health); r3 is stopped with SIGTERM and started again. The test shows:

1. every handoff any router acknowledged (202/200) reaches the Met's CAD under its handoff id
   as idempotency key, within `DELIVERY_BOUND_S` of the kill, and never under another key
   (a redelivery carries the same key); those r1 held when it died are taken over by the
   routers still running, before r3 restarts; a re-post to another router gets the same id;
2. every call is answered, at a centre that is up: none failed, none at the Met once its
   declaration was shared, none at Kent after it failed;
3. exactly one live router reports itself leader (`/readyz`, `overflow_leader`) within
   `TAKEOVER_S` of the leader's death, never two at once, and the retained MQTT
   `overflow/state/{force}` go on being published after the kill: the new leader republishes
   every force and publishes Kent's failure, and a fresh subscriber reads Kent down;
4. every live instance (r2, and r3 after its restart, as r1 before its death) shows the same
   declared state and override for the Met.

Bounded: fixed counts of calls and handoffs, every wait with a deadline; about 40 s in all.
What the run saw (MQTT messages, leader rounds, CAD receipts) is left in `record.json` beside
the routers' and Kamailio's logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiomqtt
import pytest
import yaml
from aiohttp import web
from conftest import Broker, need, private_broker, served, stop_task
from sipkit import (
    PACKAGES,
    TOKENS,
    VIEWER_ENV,
    CallerRun,
    Centre,
    Proxy,
    Router,
    place_calls,
    tcp_port,
    tools_present,
    udp_port,
    write_forces,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]
T = TypeVar("T")

NAMES = ("r1", "r2", "r3")
MANAGER_ENV = "E2E_TOKEN_MANAGER"
OPERATOR = "Insp. E2E Instances"
PARTNER_ENVS = {"kent": "E2E_TOKEN_PARTNER_KENT", "surrey": "E2E_TOKEN_PARTNER_SURREY"}
SECRETS = {MANAGER_ENV: "e2e-manager-token",
           **{env: f"e2e-partner-{force}-token" for force, env in PARTNER_ENVS.items()}}
DECLARATION = {"state": "down", "reason": "phones failing (e2e)"}

RATE, HOLD_MS = 5, 800  # the Met's 999 calls through Kamailio
RUN_S = 28.0  # calls for this long: CALLS in all
CALLS = int(RATE * RUN_S)
# seconds into the run; r3 restarts (and takes up whatever nobody holds) only once r1's
# orphaned handoffs must have been taken over: lease 5 s, then their backlog
DECLARE_AT, KILL_AT, KENT_FAILS_AT, RESTART_AT = 2.0, 6.0, 8.0, 20.0
SUBMIT_UNTIL = 24.0  # partners hand incidents over until then
HANDOFF_EVERY_S = 0.1
BURST = 24  # handed to r1 just before it is killed: its CAD deliveries are still queued
CAD_DELAY_S = 0.15  # the Met's CAD takes this long per incident; 2 in flight per router
REPOST_EVERY = 8  # every 8th accepted incident is posted again, to another router
DELIVERY_BOUND_S = 30.0  # every acknowledged handoff at the CAD within this of the kill
TAKEOVER_S = 5.0  # a live router leads within this of the leader's death
SHARE_S = 1.5  # a declaration reaches the other routers (LISTEN/NOTIFY) within this
FINAL_OK = {"delivered", "acknowledged", "completed"}


def bearer(env: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {(TOKENS | SECRETS)[env]}"}


async def sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


async def until(check: Callable[[], Awaitable[bool]], within_s: float,
                every_s: float = 0.05) -> bool:
    """Poll `check` until it holds (True) or `within_s` passes (False)."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True


# ---- the Met's CAD --------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    at: float
    force: str  # whose CAD URL it was posted to
    sender: str
    incident_id: str


@dataclass
class Cad:
    """The destination CADs over HTTP (the `http_json` adapter's peer, EIDO documents): each
    delivery is recorded under its `Idempotency-Key`, answered 201 once and 200 for a repeat."""

    delay_s: float
    received: dict[str, list[Receipt]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        doc = await request.json()
        incident = doc["extension"]["overflowRouter"]["incident"]
        await asyncio.sleep(self.delay_s)
        duplicate = key in self.received
        self.received.setdefault(key, []).append(Receipt(
            time.time(), request.match_info["force"], incident["from"], incident["incident_id"]))
        return web.json_response({"reference": f"CAD-{key[:8]}", "duplicate": duplicate},
                                 status=200 if duplicate else 201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/cad/{force}", self.handle)
        return app

    def first_at(self, key: str) -> float | None:
        receipts = self.received.get(key)
        return receipts[0].at if receipts else None


# ---- partners handing incidents over --------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    id: str
    sender: str
    incident_id: str
    by: str  # the router that acknowledged it
    at: float
    status: int


OPENED_AT = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def incident(n: int, sender: str) -> dict[str, Any]:
    return {
        "incident_id": f"{sender.upper()}-E2E-{n:05d}", "from": sender, "to": "met",
        "priority": ("P1", "P2", "P3")[n % 3], "service": "999", "call_id": f"e2e-{n}",
        "opened_at": OPENED_AT,
        "location": {"lat": 51.27, "lon": 0.52, "address": f"{n} High St, Maidstone"},
        "category": "burglary", "summary": f"incident {n}, caller diverted from the Met",
    }


@dataclass
class Partners:
    """Kent's and Surrey's CADs handing the Met's incidents back: each POST goes to a chosen
    router first, then to the next while a router refuses, times out or answers 429/5xx."""

    routers: list[Router]
    session: aiohttp.ClientSession
    accepted: dict[str, Accepted] = field(default_factory=dict)  # by handoff id
    ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (from, incident) -> id
    conflicts: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    reposts: list[tuple[int, bool]] = field(default_factory=list)  # (status, same id)
    attempts: int = 0
    count: int = 0

    async def submit(self, body: dict[str, Any], first: int, deadline: float
                     ) -> Accepted | None:
        token = bearer(PARTNER_ENVS[body["from"]])
        n = first
        while time.monotonic() < deadline:
            router = self.routers[n % len(self.routers)]
            self.attempts += 1
            try:
                async with self.session.post(f"{router.url}/v1/handoffs", json=body,
                                             headers=token) as resp:
                    if resp.status in (200, 202):
                        return self._record((await resp.json())["id"], body, router.name,
                                            resp.status)
                    if resp.status != 429 and resp.status < 500:
                        self.refused.append(f"{router.name}: {resp.status} "
                                            f"{await resp.text()}")
                        return None
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            n += 1
            await asyncio.sleep(0.02)
        self.refused.append(f"{body['incident_id']}: no router acknowledged it in time")
        return None

    def _record(self, hid: str, body: dict[str, Any], by: str, status: int) -> Accepted:
        key = (body["from"], body["incident_id"])
        if self.ids.setdefault(key, hid) != hid:
            self.conflicts.append(f"{key} acknowledged as {self.ids[key]} and as {hid}")
        done = Accepted(hid, body["from"], body["incident_id"], by, time.time(), status)
        self.accepted.setdefault(hid, done)
        return done

    async def hand_over(self, n: int, first: int, deadline: float) -> None:
        body = incident(n, ("kent", "surrey")[n % 2])
        done = await self.submit(body, first, deadline)
        if done is not None and n % REPOST_EVERY == 0:  # the same incident, to another router
            by = next(i for i, r in enumerate(self.routers) if r.name == done.by)
            again = await self.submit(body, by + 1, deadline)
            if again is not None:
                self.reposts.append((again.status, again.id == done.id))

    async def steady(self, until_at: float, deadline: float) -> None:
        """One incident every HANDOFF_EVERY_S, the routers taken in turn, until `until_at`."""
        tasks: list[asyncio.Task[None]] = []
        while time.time() < until_at:
            self.count += 1
            tasks.append(asyncio.create_task(self.hand_over(self.count, self.count, deadline)))
            await asyncio.sleep(HANDOFF_EVERY_S)
        await asyncio.gather(*tasks)

    async def burst(self, router: int, count: int, deadline: float) -> None:
        """`count` incidents at once, to `routers[router]` first (numbered from 10,000: once)."""
        await asyncio.gather(*(self.submit(incident(10_000 + i, ("kent", "surrey")[i % 2]),
                                           router, deadline) for i in range(count)))


# ---- who leads, and what the broker carries ------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One look at every router's /readyz, all at once."""

    at: float  # asked
    done: float  # every answer in
    leader: dict[str, bool]  # router name -> says it leads (those that answered only)
    instance: dict[str, str | None]  # router name -> the instance it reports


@dataclass
class Leaders:
    """Every router's /readyz ten times a second, for the test's whole run."""

    routers: list[Router]
    rounds: list[Round] = field(default_factory=list)

    async def watch(self) -> None:
        while len(self.rounds) < 2_000:  # 200 s at most
            at = time.time()
            answers = await asyncio.gather(*(r.readyz(0.5) for r in self.routers))
            self.rounds.append(Round(
                at, time.time(),
                {r.name: a.get("leader") is True for r, a in zip(self.routers, answers,
                                                                   strict=True) if a},
                {r.name: (a or {}).get("instance") for r, a in zip(self.routers, answers,
                                                                    strict=True)}))
            await asyncio.sleep(0.1)

    def leading(self, rnd: Round) -> list[str]:
        return sorted(name for name, leads in rnd.leader.items() if leads)


@dataclass(frozen=True)
class Published:
    at: float
    topic: str
    payload: dict[str, Any]


async def record_states(port: int, into: list[Published], ready: asyncio.Event) -> None:
    """Every `overflow/state/#` message the broker carries, as a partner's dashboard sees it."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("overflow/state/#", qos=1)
        ready.set()
        async for message in client.messages:
            if isinstance(message.payload, bytes | bytearray) and message.payload:
                into.append(Published(time.time(), str(message.topic),
                                      json.loads(message.payload)))


async def retained_states(port: int, forces: int) -> dict[str, dict[str, Any]]:
    """What a subscriber arriving now is given: the retained `overflow/state/{force}`."""
    found: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("overflow/state/#", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes | bytearray):
                        found[str(message.topic)] = json.loads(message.payload)
                        if len(found) >= forces:
                            break
    return found


# ---- the site -------------------------------------------------------------------------------


def instance_configs(tmp: Path, centres: dict[str, Centre], cad_url: str, store: str,
                     mqtt_port: int) -> dict[str, Path]:
    """One forces.yaml per router, alike but for the audit log and spool folder: the Met's
    partners are Kent and Surrey; every CAD is `http_json` to `cad_url`; one PostgreSQL and
    one broker for all."""
    base = write_forces(tmp / "forces.yaml", centres, {"met": ["kent", "surrey"]}, tmp)
    raw = yaml.safe_load(base.read_text())
    raw["service"]["tokens"] += [
        {"env": MANAGER_ENV, "role": "manager", "operator": OPERATOR, "rate_limit": "off"},
        *({"env": env, "role": f"partner:{force}", "rate_limit": "off"}
          for force, env in PARTNER_ENVS.items())]
    raw["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": mqtt_port}
    raw["handoff"] = {"store": store, "max_concurrency": 2,
                      "retry": {"attempts": 3, "initial_s": 0.05, "max_s": 0.3,
                                "attempt_timeout_s": 2.0, "hold_probe_s": 0.5}}
    for fid, force in raw["forces"].items():
        force["cad"] = {"adapter": "http_json",
                        "options": {"url": f"{cad_url}/{fid}", "timeout_s": 2.0}}
    paths = {}
    for name in NAMES:
        (tmp / name).mkdir()
        raw["service"]["audit_log"] = str(tmp / name / "audit.jsonl")
        raw["handoff"]["spool_dir"] = str(tmp / name / "spool")
        paths[name] = tmp / name / "forces.yaml"
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return paths


@dataclass
class Site:
    """What `site()` started."""

    centres: dict[str, Centre]
    routers: list[Router]
    proxy: Proxy
    cad: Cad


@contextlib.asynccontextmanager
async def site(tmp: Path, store: str, broker: Broker) -> AsyncIterator[Site]:
    """Centres, the CAD, three routers (r1 first: it takes the lead) and Kamailio asking
    r1, r3, r2 in that order; everything stopped on the way out, even on failure."""
    centres = {f: Centre(f, udp_port(), tcp_port(), tmp) for f in ("met", "kent", "surrey")}
    cad = Cad(CAD_DELAY_S)
    async with served(cad.app()) as cad_port:
        configs = instance_configs(tmp, centres, f"http://127.0.0.1:{cad_port}/cad", store,
                                   broker.port)
        routers = [Router(configs[name], tcp_port(), tmp, name=name,
                          env=SECRETS | {"OVERFLOW_INSTANCE": name}) for name in NAMES]
        r1, r2, r3 = routers
        proxy = Proxy(configs["r1"], udp_port(), tmp, r1.url, breaker_s=2,
                      more_routers=[r3.url, r2.url])
        try:
            for centre in centres.values():
                await centre.start()
            await r1.start()
            await until(lambda: _leads(r1), 10.0)  # asserted on later, from the rounds
            await asyncio.gather(r2.start(), r3.start())
            await proxy.start()
            yield Site(centres, routers, proxy, cad)
        finally:
            await proxy.stop()
            for router in routers:
                await router.stop()
            for centre in centres.values():
                await centre.fail()


async def _leads(router: Router) -> bool:
    ready = await router.readyz()
    return ready is not None and ready.get("leader") is True


async def forces_view(session: aiohttp.ClientSession, router: Router) -> dict[str, Any]:
    async with session.get(f"{router.url}/v1/forces", headers=bearer(VIEWER_ENV)) as resp:
        resp.raise_for_status()
        body: dict[str, Any] = (await resp.json())["forces"]
    return body


def declared(view: dict[str, Any]) -> dict[str, Any]:
    """What a declaration decides about the Met, as one router shows it."""
    met = view["met"]
    return {"state": met["state"], "override": met.get("override")}


async def leader_gauge(session: aiohttp.ClientSession, router: Router) -> float | None:
    async with session.get(f"{router.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("overflow_leader") and not line.startswith("overflow_leader_"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def statuses(session: aiohttp.ClientSession, router: Router) -> dict[str, str]:
    async with session.get(f"{router.url}/v1/handoffs?to=met&limit=1000",
                           headers=bearer(VIEWER_ENV)) as resp:
        body = await resp.json()
    return {h["id"]: h["status"] for h in body.get("handoffs", [])}


# ---- the test -------------------------------------------------------------------------------


async def test_three_routers_one_killed_one_restarted(tmp_path: Path, pg_dsn: str) -> None:
    need(tools_present(), "kamailio with http_client, and sipp", PACKAGES)
    began = time.monotonic()
    published: list[Published] = []
    subscribed = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=2)
    async with contextlib.AsyncExitStack() as stack:
        broker = stack.enter_context(private_broker())

        def background(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
            """A task of the test's, stopped (sipp and all) if the test fails on the way."""
            task = asyncio.create_task(coro)
            stack.push_async_callback(stop_task, task)
            return task

        feed = background(record_states(broker.port, published, subscribed))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        s = await stack.enter_async_context(site(tmp_path, pg_dsn, broker))
        await asyncio.wait_for(subscribed.wait(), 5)
        r1, r2, r3 = s.routers
        up = time.monotonic() - began
        for r in s.routers:
            await r.wait_states(lambda st: all(v == "normal" for v in st.values()))
        leaders = Leaders(s.routers)
        watching = background(leaders.watch())
        partners = Partners(s.routers, session)
        t0 = time.time()
        deadline = time.monotonic() + RUN_S + 20  # the partners' last tries
        caller = background(place_calls(
            s.proxy.port, tmp_path, origin="met", rate=RATE, calls=CALLS, hold_ms=HOLD_MS,
            timeout_s=RUN_S + 30))
        handing = background(partners.steady(t0 + SUBMIT_UNTIL, deadline))

        # a manager declares the Met down on r2; r1 and r3 must show it at once
        await sleep_until(t0 + DECLARE_AT)
        async with session.put(f"{r2.url}/v1/forces/met/override", json=DECLARATION,
                               headers=bearer(MANAGER_ENV)) as resp:
            declare_status, declare_body = resp.status, await resp.json()
        declared_at = time.time()
        views: dict[str, dict[str, Any]] = {}

        async def everyone_shows_it() -> bool:
            for r in (r1, r2, r3):
                views[r.name] = declared(await forces_view(session, r))
            return all(v["state"] == "down" and v["override"] for v in views.values())

        shared = await until(everyone_shows_it, SHARE_S)
        shared_in = time.time() - declared_at
        before_kill = dict(views)

        # a burst lands on r1, and r1 (the leader) dies with its deliveries queued
        await sleep_until(t0 + KILL_AT - 0.5)
        await partners.burst(0, BURST, deadline)
        kill_at = time.time()
        await r1.kill()

        await sleep_until(t0 + KENT_FAILS_AT)
        kent_failed_at = time.time()
        await s.centres["kent"].fail()

        await sleep_until(t0 + RESTART_AT)
        term_at = time.time()
        await r3.stop()  # SIGTERM
        await r3.start()
        restarted_in = time.time() - term_at

        await handing
        run: CallerRun = await caller
        delivered = await until(
            lambda: _all_delivered(s.cad, partners), kill_at + DELIVERY_BOUND_S - time.time(),
            every_s=0.1)
        last_delivery = max((s.cad.first_at(h) or 0.0) for h in partners.accepted)
        final_statuses: dict[str, str] = {}

        async def all_final() -> bool:
            final_statuses.update(await statuses(session, r2))
            return all(final_statuses.get(h) in FINAL_OK for h in partners.accepted)

        settled = await until(all_final, 5.0, every_s=0.2)
        await asyncio.sleep(0.5)  # one more look at who leads, all settled
        await stop_task(watching)
        after = {r.name: declared(await forces_view(session, r)) for r in (r2, r3)}
        gauges = {r.name: await leader_gauge(session, r) for r in (r2, r3)}
        retained = await retained_states(broker.port, len(s.centres))
        await stop_task(feed)
    took = time.monotonic() - began

    # ---- what happened, for the log and for whoever reads a failure ----
    save_record(tmp_path / "record.json", published=published, rounds=leaders.rounds,
                cad=s.cad.received, accepted=partners.accepted,
                marks={"t0": t0, "declared": declared_at, "kill": kill_at,
                       "kent_failed": kent_failed_at, "term": term_at})
    by_router = Counter(a.by for a in partners.accepted.values())
    r1_queued = [a for a in partners.accepted.values() if a.by == "r1"
                 and (s.cad.first_at(a.id) or float("inf")) > kill_at]
    retried_home = retried_at(s.proxy, f"sip:999@127.0.0.1:{s.centres['met'].sip_port}")
    r1_last = max(((s.cad.first_at(a.id) or float("inf")) - kill_at for a in r1_queued),
                  default=0.0)
    redelivered = sum(len(v) - 1 for v in s.cad.received.values())
    takeover = next((rnd for rnd in leaders.rounds
                     if rnd.at > kill_at and len(leaders.leading(rnd)) == 1), None)
    print(f"\nup in {up:.1f}s; {len(partners.accepted)} handoffs acknowledged "
          f"{dict(sorted(by_router.items()))} ({partners.attempts} POSTs), "
          f"{len(r1_queued)} of r1's queued at its kill, the last of them at the CAD "
          f"{r1_last:.1f}s after it; "
          f"last at the CAD {last_delivery - kill_at:.1f}s after the kill; "
          f"{redelivered} redeliveries; declaration shared in {shared_in:.2f}s; "
          f"leader after kill: {takeover and leaders.leading(takeover)} in "
          f"{(takeover.at - kill_at) if takeover else float('nan'):.2f}s; r3 back in "
          f"{restarted_in:.1f}s; calls {run.centres()}, {len(retried_home)} retried at home by "
          f"Kamailio; whole test {took:.1f}s")

    # 1. every acknowledged handoff at its CAD, under its own id, once per incident
    assert not partners.refused and not partners.conflicts, (partners.refused,
                                                             partners.conflicts)
    assert by_router.keys() == set(NAMES), by_router  # spread over all three
    assert len(r1_queued) >= 5, "r1 had delivered its burst before the kill: nothing tested"
    assert r1_last < term_at - kill_at, "r1's orphans waited for a router to (re)start"
    assert delivered, sorted(set(partners.accepted) - set(s.cad.received))[:10]
    assert last_delivery - kill_at <= DELIVERY_BOUND_S
    assert set(s.cad.received) == set(partners.accepted), "a delivery under an unknown key"
    for hid, receipts in s.cad.received.items():
        a = partners.accepted[hid]
        assert {(r.force, r.sender, r.incident_id) for r in receipts} == \
            {("met", a.sender, a.incident_id)}, (hid, receipts)
    assert partners.reposts and all(status == 200 and same for status, same in
                                    partners.reposts), partners.reposts
    assert settled, {h: final_statuses.get(h) for h in partners.accepted
                     if final_statuses.get(h) not in FINAL_OK}

    # 2. every call answered, at a centre that was up and not declared down
    assert run.created == CALLS and run.failed == 0 and run.successful == CALLS, run
    assert len(run.answered) == CALLS
    # the routers honour the declaration: the Met gets none of its calls once it is shared,
    # not even Kamailio's retry of a call whose partner failed under it (Kent): that goes on
    # to another partner the routers were sending the Met's calls to
    at_met = [a for a in run.answered if a.centre == "met"
              and a.at - a.setup_s > declared_at + SHARE_S]
    assert not retried_home, retried_home
    at_kent = [a for a in run.answered if a.centre == "kent" and a.at > kent_failed_at]
    assert not at_met and not at_kent, (at_met, at_kent)
    routed_late = {a.centre for a in run.answered if a.at > kent_failed_at + 1.0}
    assert routed_late == {"surrey"}, run.centres(kent_failed_at)  # the one left to take them

    # 3. one leader: r1 before its death; one live router within TAKEOVER_S; never two
    assert all(rnd.instance[r.name] in (r.name, None) for rnd in leaders.rounds
               for r in s.routers), "a router reports another instance's name"
    before = [rnd for rnd in leaders.rounds if rnd.done < kill_at]
    assert before and leaders.leading(before[-1]) == ["r1"], before[-1:]
    assert kill_at - before[-1].done < 1.0, before[-1]
    assert takeover is not None and takeover.at - kill_at <= TAKEOVER_S, leaders.rounds[-3:]
    assert not [rnd for rnd in leaders.rounds if len(leaders.leading(rnd)) > 1]
    last = leaders.rounds[-1]
    assert len(leaders.leading(last)) == 1 and "r1" not in last.leader, last
    assert sorted(g for g in gauges.values() if g is not None) == [0.0, 1.0], gauges
    assert gauges[leaders.leading(last)[0]] == 1.0, (gauges, last)
    after_kill = {p.topic for p in published if p.at > kill_at}
    assert after_kill >= {f"overflow/state/{f}" for f in s.centres}, after_kill  # republished
    assert any(p.topic == "overflow/state/kent" and p.payload["state"] == "down"
               for p in published if p.at > kent_failed_at), "Kent's failure not published"
    kent_down = [p for p in published if p.topic == "overflow/state/kent"
                 and p.payload["state"] == "down" and kent_failed_at < p.at < term_at]
    # by the leader alone: one router's transition (its `since`), not one for each router
    assert kent_down and len({p.payload["since"] for p in kent_down}) == 1, kent_down
    assert retained.get("overflow/state/kent", {}).get("state") == "down", retained
    assert retained.get("overflow/state/met", {}).get("state") == "down", retained

    # 4. the declaration, the same on every live instance
    assert declare_status == 200 and declare_body.get("remembered") is True, declare_body
    assert shared, before_kill
    assert before_kill["r1"] == before_kill["r2"] == before_kill["r3"], before_kill
    assert after["r2"] == after["r3"] == before_kill["r2"], after
    assert after["r2"]["override"]["source"] == f"manager:{OPERATOR}", after["r2"]
    assert took < 110, took


def save_record(path: Path, **parts: Any) -> None:
    """The run as JSON beside the logs (MQTT messages, leader rounds, CAD receipts, handoffs
    acknowledged, the times things were done), for reading a failure after the fact."""
    def plain(value: Any) -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        raise TypeError(type(value).__name__)

    path.write_text(json.dumps(parts, default=plain, indent=1), encoding="utf-8")


# Kamailio's failure route: the router's choice answered 408/5xx, so it tries home, then the
# static alternative (deploy/kamailio/kamailio.cfg), e.g. "{1 40-123@127.0.0.1} <script>: 408
# from sip:999@127.0.0.1:5001: trying sip:999@127.0.0.1:5002"
RETRIED = re.compile(r"\{\d+ (\d+)-[^}]*\} <script>: \d+ from \S+: trying (\S+)")


def retried_at(proxy: Proxy, uri: str) -> set[int]:
    """The sipp call numbers Kamailio retried at `uri` after the router's choice failed."""
    log = (proxy.out / "kamailio.log").read_text(errors="replace")
    return {int(m[1]) for m in RETRIED.finditer(log) if m[2] == uri}


async def _all_delivered(cad: Cad, partners: Partners) -> bool:
    return all(h in cad.received for h in partners.accepted)
