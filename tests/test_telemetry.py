"""Telemetry payloads as they arrive: valid, broken, stale."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from router.watch.telemetry import (
    MAX_PAYLOAD_BYTES,
    TelemetryError,
    as_dict,
    force_of,
    is_stale,
    parse_telemetry,
)

GOOD = {"telephony_up": True, "cad_up": False, "calls_waiting": 4, "handlers_available": 2,
        "handlers_on_duty": 30, "oldest_wait_s": 12.5}


def test_epoch_and_iso_timestamps_are_both_accepted() -> None:
    now = time.time()
    a = parse_telemetry(json.dumps({**GOOD, "ts": now}).encode())
    b = parse_telemetry(json.dumps({**GOOD, "ts": datetime.fromtimestamp(now, UTC)
                                    .isoformat()}).encode())
    naive = parse_telemetry(json.dumps({**GOOD, "ts": "2025-03-25T21:36:00"}).encode())
    assert abs(a.ts.timestamp() - now) < 1e-3 and abs(b.ts.timestamp() - now) < 1e-3
    assert naive.ts.tzinfo is not None  # naive means UTC
    assert a.cad_up is False and a.calls_waiting == 4
    assert as_dict(a)["ts"] == a.ts.isoformat()


def test_added_fields_are_tolerated() -> None:
    t = parse_telemetry(json.dumps({**GOOD, "ts": time.time(), "queue_state": "Full"}).encode())
    assert t.handlers_on_duty == 30


@pytest.mark.parametrize(("payload", "why"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({**GOOD}).encode(), "ts"),
    (json.dumps({**GOOD, "ts": 1, "calls_waiting": -1}).encode(), "calls_waiting"),
    (json.dumps({**GOOD, "ts": 1, "telephony_up": "perhaps"}).encode(), "telephony_up"),
    (b" " * (MAX_PAYLOAD_BYTES + 1), "exceeds"),
])
def test_bad_payloads_raise_one_line_reasons(payload: bytes, why: str) -> None:
    with pytest.raises(TelemetryError, match=why) as info:
        parse_telemetry(payload)
    assert "\n" not in str(info.value)


def test_staleness_by_measurement_time() -> None:
    now = time.time()
    t = parse_telemetry(json.dumps({**GOOD, "ts": now - 30}).encode())
    assert is_stale(t, now, 10.0) and not is_stale(t, now, 60.0)
    ahead = parse_telemetry(json.dumps({**GOOD, "ts": now + 5}).encode())
    assert ahead.age_s(now) == 0.0  # a centre clock ahead of ours is not "older than fresh"


def test_topic_to_force() -> None:
    assert force_of("centres/met/telemetry") == "met"
    assert force_of("centres//telemetry") is None
    assert force_of("centres/met/telemetry/x") is None
    assert force_of("state/met") is None
