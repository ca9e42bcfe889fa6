"""Decision engine speed: decisions per second and per-decision latency.

`python -m bench engine [--decisions N] [--seed N]`

Two configs, run one after the other in the same process:
- the bundled `config/forces.yaml` (8 forces);
- a national-scale config generated here: 43 forces, each with 5 partners per service.

The workload is the same shape for both: 999 and 101 calls (60/40) from origins drawn by
centre size, under a mix of states that changes every 2,000 calls (about 1 in 10 centres down,
1 in 10 overloaded, some draining, recovering or with CAD down), so home, overflow, shed and
last-resort paths all run. Every call is added to the Ledger and ended a random number of calls
later, as in service. Two passes per config:
- throughput: the whole loop (decide + ledger add + end), timed once around the loop, best of
  `--repeat` passes, per second of the process's CPU time (one core's worth, whatever else
  runs on the machine) and per wall-clock second;
- latency: `time.perf_counter_ns()` around each `decide` alone (p50, p99, p99.9).
Targets (issue 2): >= 200,000 decisions/s on one core, p99 <= 20 us on the bundled config.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.config import RouterConfig, load_config, parse_config
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Reason, Service, Snapshot
from router.engine.policy import Policy

BUNDLED = Path(__file__).resolve().parent.parent / "config" / "forces.yaml"
TARGET_RATE = 200_000
TARGET_P99_US = 20.0
STATE_EVERY = 2_000  # decisions between snapshot changes
STATE_MIX = ([CentreState.NORMAL] * 14 + [CentreState.DOWN] * 2 + [CentreState.OVERLOADED] * 2
             + [CentreState.DRAINING, CentreState.RECOVERING])
MAX_SECONDS = 60.0  # a bound on each pass whatever --decisions says


def national_config(forces: int = 43, partners: int = 5) -> RouterConfig:
    """A generated config: forces on a ring, each overflowing to its next `partners`."""
    ids = [f"force{i:02d}" for i in range(forces)]
    rng = random.Random(43)
    doc: dict[str, Any] = {"version": 1, "forces": {}}
    for i, fid in enumerate(ids):
        handlers = rng.choice([10, 20, 30, 40, 60, 120])
        aid = max(4, handlers // 3)
        routes = [{"to": ids[(i + k) % forces], "weight": rng.randint(1, 3)}
                  for k in range(1, partners + 1)]
        routes[-1]["max_concurrent"] = 3
        doc["forces"][fid] = {
            "name": f"Force {i}",
            "centre": {"handlers_on_duty": handlers, "overflow_queue": handlers // 5,
                       "max_queue": handlers, "on_cad_down": rng.choice(["keep", "overflow"]),
                       "shed_101": {"queue": f"sip:101-queue@{fid}.example",
                                    "announcement": f"sip:101-closed@{fid}.example"}},
            "sip": {"999": f"sip:999@{fid}.example", "101": f"sip:101@{fid}.example"},
            "cad": {"adapter": "sim"},
            "mutual_aid": {"max_concurrent": aid, "only_while_queue_below": handlers // 4,
                           "reserve_999": aid // 3},
            "overflow": {"999": routes, "101": routes},
        }
    return parse_config(yaml.safe_dump(doc), "<national>")


@dataclass(frozen=True)
class Workload:
    """Everything drawn in advance, so the timed loops only decide, add and end."""

    calls: list[tuple[Service, str, str]]  # service, origin, call id
    ends: list[tuple[str, ...]]  # call ids that end just after call n is decided
    snapshots: list[Snapshot]


def workload(cfg: RouterConfig, decisions: int, seed: int) -> Workload:
    rng = random.Random(seed)
    forces = list(cfg.forces)
    sizes = [cfg.forces[f].centre.handlers_on_duty + 1 for f in forces]
    # calls stay in flight long enough to fill about 70 % of all handlers on average,
    # so queues form where centres are down or busy and partners reach their caps
    hold = int(0.7 * sum(sizes))
    calls = [(Service.EMERGENCY if rng.random() < 0.6 else Service.NON_EMERGENCY,
              rng.choices(forces, sizes)[0], f"call-{n}") for n in range(decisions)]
    ends: list[list[str]] = [[] for _ in range(decisions)]
    for n in range(decisions):
        end = n + int(rng.expovariate(1 / hold)) + 1
        if end < decisions:
            ends[end].append(f"call-{n}")
    snapshots = []
    for version in range(decisions // STATE_EVERY + 1):
        views = {}
        for fid in forces:
            state = rng.choice(STATE_MIX)
            views[fid] = CentreView(state, telephony_up=True, cad_up=rng.random() > 0.05,
                                    since=float(version * STATE_EVERY - rng.randint(0, 90)))
        snapshots.append(Snapshot(views, version))
    return Workload(calls, [tuple(e) for e in ends], snapshots)


@dataclass(frozen=True)
class Pass:
    per_cpu_s: float  # decisions per second of this process's CPU time: one core's worth
    per_wall_s: float  # lower when other processes take the core
    reasons: Counter[Reason]


def throughput(cfg: RouterConfig, work: Workload) -> Pass:
    """Decisions per second for the full loop: decide, add to the ledger, end later."""
    policy, ledger = Policy(cfg), Ledger()
    snapshots, ends, reasons = work.snapshots, work.ends, []
    decide, add, end = policy.decide, ledger.add, ledger.end
    deadline = time.perf_counter() + MAX_SECONDS
    start, cpu_start = time.perf_counter(), time.process_time()
    for n, (service, origin, call_id) in enumerate(work.calls):
        now = float(n)
        d = decide(service, origin, snapshots[n // STATE_EVERY], ledger, now)
        add(call_id, d, now)
        for ended in ends[n]:
            end(ended)
        reasons.append(d.reason)
        if n % 10_000 == 0 and time.perf_counter() > deadline:
            break
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Pass(len(reasons) / cpu, len(reasons) / wall, Counter(reasons))


def latencies(cfg: RouterConfig, work: Workload) -> list[int]:
    """Nanoseconds per `decide` call alone, on the same workload."""
    policy, ledger = Policy(cfg), Ledger()
    out: list[int] = []
    clock = time.perf_counter_ns
    deadline = time.perf_counter() + MAX_SECONDS
    for n, (service, origin, call_id) in enumerate(work.calls):
        snapshot = work.snapshots[n // STATE_EVERY]
        t0 = clock()
        d = policy.decide(service, origin, snapshot, ledger, float(n))
        out.append(clock() - t0)
        ledger.add(call_id, d, float(n))
        for ended in work.ends[n]:
            ledger.end(ended)
        if n % 10_000 == 0 and time.perf_counter() > deadline:
            break
    return out


def percentile(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(p / 100 * len(sorted_ns)))] / 1000


def clock_overhead_ns(samples: int = 100_000) -> int:
    clock = time.perf_counter_ns
    best = min(-clock() + clock() for _ in range(samples))
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__)
    parser.add_argument("--decisions", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="throughput passes (best kept)")
    args = parser.parse_args(argv)
    print(f"{args.decisions:,} decisions per pass, states change every {STATE_EVERY:,}; "
          f"timer overhead ~{clock_overhead_ns()} ns (included in latencies)")
    print(f"{'config':18} {'forces':>6} {'per CPU s':>10} {'per wall s':>10} {'p50 us':>7} "
          f"{'p99 us':>7} {'p99.9 us':>8} {'max us':>8}  reasons")
    status = 0
    for name, cfg in (("bundled", load_config(BUNDLED)), ("national (43 x 5)", national_config())):
        work = workload(cfg, args.decisions, args.seed)
        # best of a few passes: on a shared machine the slow ones measure the neighbours
        best = max((throughput(cfg, work) for _ in range(args.repeat)),
                   key=lambda run: run.per_cpu_s)
        rate, reasons = best.per_cpu_s, best.reasons
        ns = sorted(latencies(cfg, work))
        p50, p99, p999 = (percentile(ns, p) for p in (50, 99, 99.9))
        total = sum(reasons.values())
        mix = " ".join(f"{r.value}:{100 * c / total:.0f}%" for r, c in reasons.most_common())
        print(f"{name:18} {len(cfg.forces):>6} {rate:>10,.0f} {best.per_wall_s:>10,.0f} "
              f"{p50:>7.2f} {p99:>7.2f} {p999:>8.2f} {ns[-1] / 1000:>8.1f}  {mix}")
        if name == "bundled" and (rate < TARGET_RATE or p99 > TARGET_P99_US):
            print(f"  bundled misses the target (>= {TARGET_RATE:,}/s, p99 <= {TARGET_P99_US} us)")
            status = 1
    return status


if __name__ == "__main__":  # `python -m bench.engine --decisions N` passes options through
    raise SystemExit(main(sys.argv[1:]))
