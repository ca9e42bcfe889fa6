"""From a partner's handoff to a dispatcher's answer, with the demo's simulated CADs.

`python -m bench acknowledge [--n N] [--rate R]`

N P1 handoffs from Kent to the Met, R a second, through the real desk on SQLite, to the Met's
simulated CAD whose dispatchers answer as the demo's do (router.tools.demo.DISPATCHERS:
accept after a few seconds, reject now and then, complete later). Reported: from submission
to the CAD's technical acknowledgement (`delivered`) and to a dispatcher's answer
(`acknowledged` or `rejected`), p50/p90/p99 in seconds, as the sender hears them (the
desk's status messages). The dispatchers' own delay is the demo's setting, so the second
figure is that delay plus what the router adds; the difference of the medians is the
router's share.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters import sim
from router.config import RouterConfig
from router.handoff.desk import open_desk
from router.handoff.incident import Incident
from router.tools.demo import DISPATCHERS
from tests.handoff_support import config_data, incident


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


async def measure(n: int, rate: float) -> dict[str, Any]:
    sim.reset()
    with tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp:
        raw = config_data(Path(tmp), cads={"met": {"adapter": "sim", "options": {
            "latency_s": 0.005, **DISPATCHERS}}})
        config = RouterConfig.model_validate(raw)
        submitted: dict[str, float] = {}
        heard: dict[str, dict[str, float]] = {}
        answered = asyncio.Event()

        def told(message: dict[str, Any]) -> None:
            steps = heard.setdefault(str(message["handoff_id"]), {})
            steps.setdefault(str(message["status"]), time.monotonic())
            if sum(("acknowledged" in s or "rejected" in s) for s in heard.values()) >= n:
                answered.set()

        async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True,
                             notify=told) as desk:
            started = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(started + i / rate - time.monotonic(), 0))
                handoff, _ = await desk.submit(Incident.model_validate(
                    incident(i, frm="kent", to="met")))
                submitted[handoff["id"]] = time.monotonic()
            await asyncio.wait_for(answered.wait(), 120)
    delivered = [heard[h]["delivered"] - t for h, t in submitted.items()]
    answers = [min(heard[h].get("acknowledged", 1e9), heard[h].get("rejected", 1e9)) - t
               for h, t in submitted.items()]
    rejected = sum("rejected" in heard[h] for h in submitted)
    return {"n": n, "rate": rate, "delivered": _quantiles(delivered),
            "answered": _quantiles(answers), "rejected": rejected}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench acknowledge")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="handoffs a second")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.n, args.rate))
    print(f"{result['n']} P1 handoffs kent → met at {result['rate']:g}/s; the Met's dispatchers "
          f"as in the demo ({DISPATCHERS['ack_after_s']:g} s ± {DISPATCHERS['answer_jitter_s']:g}"
          f" s, {DISPATCHERS['reject_share']:.0%} rejected)")
    print(f"{'from submission to':32} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8}")
    for label, key in (("the CAD's acknowledgement", "delivered"),
                       ("a dispatcher's answer", "answered")):
        p50, p90, p99 = result[key]
        print(f"{label:32} {p50:8.3f} {p90:8.3f} {p99:8.3f}")
    print(f"rejected by a dispatcher: {result['rejected']} of {result['n']}")
    return 0
