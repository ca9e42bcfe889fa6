"""`simulate --sweep KEY=V1,V2,...`: what a setting buys, over several seeds, with 95%
confidence intervals (Student's t over the seeds' results), so a manager sees whether a
difference is more than the luck of one night.

KEY is any numeric key of the config (`forces.met.mutual_aid.max_concurrent`) or of the
scenario (`manual.delay_s`, `arrivals.met.999`; `scenario.` in front is allowed). Each value
is set in a copy and validated again, so a value the router would refuse is refused here too.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from router.config import RouterConfig
from router.tools.sim.report import Report
from router.tools.sim.scenario import Scenario

# Student's t, two-sided 95%, by degrees of freedom (1-30); beyond, the normal's 1.96
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

METRICS = {  # name: (path into a strategy's JSON, how it is shown)
    "999_within_10s": (("region", "999", "within_10s_share"), "pct"),
    "999_abandoned_share": (("region", "999", "abandoned"), "pct"),
    "999_p90_s": (("region", "999", "answer_s", "p90"), "s"),
    "101_within_10s": (("region", "101", "within_10s_share"), "pct"),
    "aid_over_cap_min": (("region", "aid_over_cap_s"), "min"),
}


class SweepError(ValueError):
    """A sweep that cannot run; the message names the key."""


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[float, ...]


def parse(text: str) -> Sweep:
    key, sep, raw = text.partition("=")
    if not sep or not key or not raw:
        raise SweepError(f"--sweep: expected KEY=V1,V2,..., got {text!r}")
    try:
        values = tuple(float(v) for v in raw.split(","))
    except ValueError:
        raise SweepError(f"--sweep: {key}: values must be numbers, got {raw!r}") from None
    return Sweep(key, values)


def apply(config: RouterConfig, scenario: Scenario, key: str, value: float) -> tuple[
        RouterConfig, Scenario]:
    """The config and scenario with `key` set to `value`, validated again."""
    path = key.removeprefix("scenario.").split(".")
    in_scenario = key.startswith("scenario.") or path[0] in Scenario.model_fields
    if not in_scenario and path[0] not in RouterConfig.model_fields:
        raise SweepError(f"--sweep: {key}: no such key in the config or the scenario")
    model: BaseModel = scenario if in_scenario else config
    doc = model.model_dump(mode="json")
    node: Any = doc
    for part in path[:-1]:
        node = _child(node, part, key)
    last = path[-1]
    old = _child(node, last, key)
    if isinstance(old, bool) or not isinstance(old, int | float):
        raise SweepError(f"--sweep: {key}: not a number (it is {old!r})")
    new: float | int = int(value) if isinstance(old, int) and value.is_integer() else value
    if isinstance(node, list):
        node[int(last)] = new
    else:
        node[last] = new
    try:
        changed = type(model).model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SweepError(f"--sweep: {key}={value:g}: {first['msg']}") from None
    if in_scenario:
        assert isinstance(changed, Scenario)
        return config, changed
    assert isinstance(changed, RouterConfig)
    return changed, scenario


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise SweepError(f"--sweep: {key}: no such key ({part!r} not found)")


def interval(samples: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval."""
    mean = statistics.fmean(samples)
    if len(samples) < 2:
        return mean, math.nan
    t = _T95[len(samples) - 2] if len(samples) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(samples) / math.sqrt(len(samples))


def metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, (path, _) in METRICS.items():
        value: Any = result
        for part in path:
            value = value[part]
        if name == "999_abandoned_share":
            offered = result["region"]["999"]["offered"]
            value = value / offered if offered else 0.0
        if name == "aid_over_cap_min":
            value = value / 60
        out[name] = math.nan if value is None else float(value)
    return out


def summarise(sweep: Sweep, seeds: list[int], runs: dict[float, list[Report]]) -> dict[str, Any]:
    """JSON: per value and strategy, each metric's mean, 95% half-width and every seed's."""
    rows = []
    for value, reports in runs.items():
        per: dict[str, dict[str, list[float]]] = {}
        for report in reports:
            for name, result in report.to_json()["strategies"].items():
                for metric, v in metrics(result).items():
                    per.setdefault(name, {}).setdefault(metric, []).append(v)
        strategies: dict[str, dict[str, dict[str, Any]]] = {}
        for name, by_metric in per.items():
            strategies[name] = {}
            for metric, samples in by_metric.items():
                mean, half = interval(samples)
                strategies[name][metric] = {"mean": _round(mean), "ci95": _round(half),
                                            "runs": [round(s, 4) for s in samples]}
        rows.append({"value": value, "strategies": strategies})
    return {"sweep": {"key": sweep.key, "seeds": seeds, "rows": rows}}


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def table(data: dict[str, Any]) -> str:
    s = data["sweep"]
    lines = [f"sweep {s['key']} over seeds {s['seeds'][0]}..{s['seeds'][-1]} "
             f"({len(s['seeds'])} runs each; mean ± 95% confidence interval)",
             f"{'value':>8} {'strategy':16} " + " ".join(f"{m:>20}" for m in METRICS)]
    for row in s["rows"]:
        for name, by_metric in row["strategies"].items():
            cells = [_cell(by_metric[m], METRICS[m][1]) for m in METRICS]
            lines.append(f"{row['value']:>8g} {name:16} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def _cell(stat: dict[str, Any], unit: str) -> str:
    mean, half = stat["mean"], stat["ci95"]
    scale, suffix = (100, "%") if unit == "pct" else (1, "")
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{mean * scale:.1f}{suffix}"
    return text if half is None else f"{text} ± {half * scale:.1f}"
