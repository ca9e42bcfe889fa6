"""Calls per second through Kamailio asking the router, against Kamailio with a static route.

`python -m bench sip [--calls N] [--rounds R]`: the same sipp caller places N short 999 calls
(answer, ACK, BYE at once) as fast as a cap of concurrent calls allows, through two Kamailio
instances in turn, on the same sipp centres: one asks the running router per INVITE (and tells
it every call's end), the other relays straight to the home centre. Rounds alternate so drift on
a shared machine hits both; the best round of each is reported, with their ratio.

Then the per-call cost of the router query over a kept-alive connection (HTTP Basic on
http_client's named connection) against a new TCP connection per query, side by side.

Then the router hangs (a stand-in that takes each query and never answers): the same calls
through Kamailio with its circuit breaker and without it, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
from pathlib import Path

from tests.e2e.sipkit import (
    PACKAGES,
    CallerRun,
    Centre,
    FakeRouter,
    Proxy,
    Router,
    place_calls,
    tcp_port,
    tools_present,
    udp_port,
    write_forces,
)

OFFERED_RATE = 2000  # calls/s offered; the concurrency cap is what really paces the caller
MAX_CONCURRENT = 60
PACED_RATE = 200  # calls/s: a fixed offered load, ~1000x the Met's peak-hour 999 rate
PACED_S = 10
TARGET_RATIO = 0.90
HUNG_RATE, HUNG_CALLS = 20, 200  # calls/s while the router hangs: 100x the Met's 999 peak


async def _round(proxy: Proxy, tmp: Path, calls: int, rate: int = OFFERED_RATE) -> CallerRun:
    return await place_calls(proxy.port, tmp, origin="met", rate=rate, calls=calls,
                             hold_ms=0, max_concurrent=MAX_CONCURRENT, timeout_s=120, log=False)


async def _bench(calls: int, rounds: int) -> int:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        centres = {f: Centre(f, udp_port(), tcp_port(), tmp) for f in ("met", "kent", "surrey")}
        forces = write_forces(tmp / "forces.yaml", centres, {"met": ["kent", "surrey"]}, tmp)
        router = Router(forces, tcp_port(), tmp)
        proxies = {"router": Proxy(forces, udp_port(), tmp, router.url, route_workers=8),
                   "static": Proxy(forces, udp_port(), tmp, None)}
        results: dict[str, list[CallerRun]] = {mode: [] for mode in proxies}
        try:
            for centre in centres.values():
                await centre.start()
            await router.start()
            await router.wait_states(lambda s: all(v == "normal" for v in s.values()))
            for proxy in proxies.values():
                await proxy.start()
            for mode in proxies:  # warm-up: connections, caches, first-call costs
                await _round(proxies[mode], tmp, min(calls, 200))
            for _ in range(rounds):
                for mode, proxy in proxies.items():
                    results[mode].append(await _round(proxy, tmp, calls))
            paced = {mode: await _round(proxy, tmp, PACED_RATE * PACED_S, PACED_RATE)
                     for mode, proxy in proxies.items()}
            reuse = await _reuse(forces, router.url, tmp, calls, rounds)
            hung = await _hung(forces, tmp)
        finally:
            for proxy in proxies.values():
                await proxy.stop()
            await router.stop()
            for centre in centres.values():
                await centre.fail()
    return _report(results, paced, calls) | _report_reuse(reuse) | _report_hung(hung)


async def _reuse(forces: Path, url: str, tmp: Path, calls: int,
                 rounds: int) -> dict[str, list[CallerRun]]:
    """Saturated rounds through Kamailio keeping its router connections alive, and through
    one opening a new TCP connection per query; the same router, alternating rounds."""
    proxies = {"reused": Proxy(forces, udp_port(), tmp, url),
               "new TCP": Proxy(forces, udp_port(), tmp, url, keepalive=False)}
    out: dict[str, list[CallerRun]] = {mode: [] for mode in proxies}
    try:
        for proxy in proxies.values():
            await proxy.start()
            await _round(proxy, tmp, min(calls, 200))
        for _ in range(rounds):
            for mode, proxy in proxies.items():
                out[mode].append(await place_calls(
                    proxy.port, tmp, origin="met", rate=OFFERED_RATE, calls=calls, hold_ms=0,
                    max_concurrent=MAX_CONCURRENT, timeout_s=120))
    finally:
        for proxy in proxies.values():
            await proxy.stop()
    return out


def _report_reuse(reuse: dict[str, list[CallerRun]]) -> int:
    print("router connection per query (saturated, setup = INVITE to 200 OK, all rounds):")
    best = {}
    for mode, runs in reuse.items():
        setups = sorted(a.setup_s for r in runs for a in r.answered) or [float("nan")]
        best[mode] = max(_rate(r) for r in runs)
        print(f"  {mode:8} best {best[mode]:7.1f} calls/s ({1e3 / best[mode]:.2f} ms/call)  "
              f"setup p50 {statistics.median(setups) * 1e3:.1f} ms  "
              f"p99 {setups[int(0.99 * (len(setups) - 1))] * 1e3:.1f} ms  "
              f"failed {sum(r.failed for r in runs)}")
    print(f"  reused/new = {best['reused'] / best['new TCP']:.2f}")
    return 0 if all(r.failed == 0 for runs in reuse.values() for r in runs) else 1


async def _hung(forces: Path, tmp: Path) -> dict[str, tuple[CallerRun, int]]:
    """The calls and the router queries they made, per mode, while the router hangs."""
    out: dict[str, tuple[CallerRun, int]] = {}
    for mode, breaker_s in (("breaker", 5), ("no breaker", 0)):
        fake = FakeRouter()
        async with fake.serving() as url:
            proxy = Proxy(forces, udp_port(), tmp / mode.replace(" ", "-"), url,
                          breaker_s=breaker_s)
            proxy.workdir.mkdir()
            try:
                await proxy.start()
                run = await place_calls(proxy.port, proxy.workdir, origin="met", rate=HUNG_RATE,
                                        calls=HUNG_CALLS, hold_ms=200, timeout_s=60)
            finally:
                await proxy.stop()
        out[mode] = run, fake.asked
    return out


def _report_hung(hung: dict[str, tuple[CallerRun, int]]) -> int:
    print(f"router hung, {HUNG_RATE} calls/s offered for {HUNG_CALLS // HUNG_RATE} s "
          "(setup = INVITE to 200 OK):")
    for mode, (run, asked) in hung.items():
        setups = sorted(a.setup_s for a in run.answered) or [float("nan")]
        print(f"  {mode:10} answered {run.successful}/{run.created}, failed {run.failed}, "
              f"router asked {asked} times, setup p50 {statistics.median(setups) * 1e3:.0f} ms "
              f"p99 {setups[int(0.99 * (len(setups) - 1))] * 1e3:.0f} ms")
    breaker = hung["breaker"][0]
    return 0 if breaker.failed == 0 and breaker.successful == breaker.created else 1


def _rate(run: CallerRun) -> float:
    return run.successful / run.elapsed_s


def _report(results: dict[str, list[CallerRun]], paced: dict[str, CallerRun],
            calls: int) -> int:
    print(f"{calls} calls per round, at most {MAX_CONCURRENT} at once, hold 0 s; "
          "calls/s = answered and hung up / wall time of the sipp run")
    best: dict[str, float] = {}
    failed = 0
    for mode, runs in results.items():
        rates = [_rate(r) for r in runs]
        failed += sum(r.failed + (r.created - r.successful) for r in runs)
        best[mode] = max(rates)
        print(f"  {mode:7} best {best[mode]:7.1f}/s  median {statistics.median(rates):7.1f}/s  "
              f"rounds {' '.join(f'{x:.1f}' for x in rates)}  failed {sum(r.failed for r in runs)}")
    print(f"  saturated: router/static = {best['router'] / best['static']:.2f}")
    print(f"offered {PACED_RATE} calls/s for {PACED_S} s:")
    for mode, run in paced.items():
        failed += run.failed + (run.created - run.successful)
        print(f"  {mode:7} {_rate(run):7.1f}/s  answered {run.successful}/{run.created}")
    ratio = _rate(paced["router"]) / _rate(paced["static"])
    print(f"  paced: router/static = {ratio:.2f} (target >= {TARGET_RATIO:.2f})")
    return 0 if failed == 0 and ratio >= TARGET_RATIO else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sip", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not tools_present():
        print(f"bench sip: needs {PACKAGES}; skipped")
        return 0
    # a SIGTERM (e.g. from `timeout`) must still run the clean-up that stops every process
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return asyncio.run(_bench(args.calls, args.rounds))
