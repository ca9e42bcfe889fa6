"""Timestamps as the router writes them everywhere (API, MQTT, audit log, sheets, EIDO)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float, timespec: str = "milliseconds") -> str:
    """Epoch seconds as ISO 8601 UTC with a `Z`: `2025-03-25T22:28:00.000Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
