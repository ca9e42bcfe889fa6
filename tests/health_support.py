"""Configs for the health tests: the bundled forces with short, test-sized health settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from router.config import RouterConfig

BUNDLED = Path(__file__).resolve().parent.parent / "config" / "forces.yaml"


def make_config(health: dict[str, Any] | None = None, *, probes: dict[str, list[dict[str, Any]]]
                | None = None, telemetry: bool = True, mqtt_port: int | None = None,
                notify: dict[str, str] | None = None, audit_log: str | None = None) -> RouterConfig:
    """Bundled forces; every force's probes replaced by `probes.get(force, [])`."""
    raw = yaml.safe_load(BUNDLED.read_text())
    raw["health"] = {**raw["health"], **(health or {})}
    for fid, force in raw["forces"].items():
        force["centre"]["probes"] = (probes or {}).get(fid, [])
        force["centre"]["telemetry"] = telemetry
        if notify and fid in notify:
            force["notify_url"] = notify[fid]
    raw["mqtt"] = {"enabled": mqtt_port is not None, "host": "127.0.0.1",
                   "port": mqtt_port or 1883, "prefix": "overflow/"}
    if audit_log:
        raw["service"]["audit_log"] = audit_log
    return RouterConfig.model_validate(raw)
