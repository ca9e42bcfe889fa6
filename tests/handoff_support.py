"""Helpers shared by the handoff tests: a small config and incidents."""

from __future__ import annotations

import copy
import datetime as dt
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from router.config import RouterConfig

ROOT = Path(__file__).resolve().parent.parent


@cache
def _bundled() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "forces.yaml").read_text())
    return data


def config_data(tmp: Path, store: str | None = None, cads: dict[str, dict[str, Any]] | None = None,
                **handoff: Any) -> dict[str, Any]:
    """The bundled eight forces, without probes or telemetry, every CAD simulated unless
    `cads` says otherwise, the store and spool in `tmp`."""
    raw = copy.deepcopy(_bundled())
    for fid, force in raw["forces"].items():
        force["centre"]["probes"] = []
        force["centre"]["telemetry"] = False
        force["cad"] = (cads or {}).get(fid, {"adapter": "sim", "options": {"latency_s": 0}})
    raw["mqtt"] = {"enabled": False}
    raw["service"]["audit_log"] = str(tmp / "audit.jsonl")
    raw["handoff"] = {
        "store": store or f"sqlite:///{tmp / 'handoffs.db'}", "spool_dir": str(tmp / "spool"),
        "max_concurrency": 4,
        "retry": {"attempts": 2, "initial_s": 0.01, "max_s": 0.05, "attempt_timeout_s": 1.0,
                  "hold_probe_s": 0.2},
        **handoff,
    }
    return raw


def make_config(tmp: Path, store: str | None = None, cads: dict[str, dict[str, Any]] | None = None,
                **handoff: Any) -> RouterConfig:
    return RouterConfig.model_validate(config_data(tmp, store, cads, **handoff))


def incident(n: int, frm: str = "kent", to: str = "met", priority: str = "P1",
             **extra: Any) -> dict[str, Any]:
    return {
        "incident_id": f"{frm.upper()}-{n:06d}", "from": frm, "to": to, "priority": priority,
        "service": "999", "call_id": f"call-{n}",
        "opened_at": dt.datetime.now(dt.UTC).isoformat(),
        "location": {"lat": 51.2, "lon": 0.5, "address": "1 High St, Maidstone"},
        "category": "burglary", "summary": f"incident {n} <script>alert(1)</script>",
        "caller": {"name": "A Caller", "phone": "+44 7700 900123"}, **extra,
    }
