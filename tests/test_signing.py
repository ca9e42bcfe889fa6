"""Signed handoffs (the scheme itself) and per-token rate limits, without a server; the
over-the-wire behaviour is in tests/test_http_security.py."""

from __future__ import annotations

import pytest

from router.config import Token
from router.config.schema import RateLimit
from router.http.limits import RateLimits, limit_of
from router.http.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, sign, verify

KEY = b"k" * 32
BODY = b'{"incident_id": "MET-1"}'
NOW = 1_764_590_400


def headers(ts: int = NOW, body: bytes = BODY, key: bytes = KEY) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(key, ts, body)}


def refused(hdrs: dict[str, str], body: bytes = BODY, now: float = NOW) -> str:
    with pytest.raises(SignatureError) as err:
        verify(KEY, hdrs, body, now=now, window_s=300)
    return err.value.code


def test_a_fresh_signature_of_the_exact_body_passes() -> None:
    verify(KEY, headers(), BODY, now=NOW + 299, window_s=300)
    verify(KEY, headers(), BODY, now=NOW - 299, window_s=300)  # a partner's clock a bit ahead


def test_known_answer() -> None:
    # a fixed vector a partner can check an implementation against (also in docs/SECURITY.md);
    # it equals: echo -n '1700000000.{}' | openssl dgst -sha256 -hmac secret
    assert sign(b"secret", 1700000000, b"{}") == (
        "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163")


def test_a_changed_body_a_wrong_key_or_a_moved_timestamp_is_refused() -> None:
    assert refused(headers(), BODY + b" ") == "bad_signature"
    assert refused(headers(key=b"other")) == "bad_signature"
    moved = headers()
    moved[TIMESTAMP_HEADER] = str(NOW + 1)
    assert refused(moved) == "bad_signature"


def test_outside_the_window_either_way_is_stale() -> None:
    assert refused(headers(), now=NOW + 301) == "stale_signature"
    assert refused(headers(), now=NOW - 301) == "stale_signature"


@pytest.mark.parametrize("hdrs", [{}, {TIMESTAMP_HEADER: str(NOW)},
                                  {SIGNATURE_HEADER: "sha256=00"}])
def test_missing_headers_are_named(hdrs: dict[str, str]) -> None:
    assert refused(hdrs) == "signature_required"


@pytest.mark.parametrize("stamp", ["-5", "1e9", "", "9" * 40, "12.5", "\u0661\u0662"])
def test_malformed_timestamps_are_refused_not_crashed(stamp: str) -> None:
    assert refused({TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: "sha256=00"}) in (
        "bad_signature", "signature_required")


def test_role_defaults_never_limit_telephony() -> None:
    assert limit_of(Token(env="T", role="telephony")) is None
    assert limit_of(Token(env="P", role="partner:kent")) == RateLimit(per_s=100, burst=200)
    assert limit_of(Token(env="P", role="partner:kent", rate_limit="off")) is None
    own = RateLimit(per_s=1, burst=2)
    assert limit_of(Token(env="T", role="telephony", rate_limit=own)) == own


async def test_a_bucket_admits_its_burst_then_says_when_to_retry() -> None:
    limits = RateLimits()
    limits.configure((Token(env="P", role="partner:kent",
                            rate_limit=RateLimit(per_s=0.5, burst=3)),
                      Token(env="T", role="telephony")))
    assert [await limits.admit("P") for _ in range(3)] == [None, None, None]
    assert await limits.admit("P") == 2.0  # one request per 2 s refills
    assert [await limits.admit("T") for _ in range(1000)] == [None] * 1000
    # a reload with the same limit keeps the bucket's level; a new limit starts afresh
    limits.configure((Token(env="P", role="partner:kent",
                            rate_limit=RateLimit(per_s=0.5, burst=3)),))
    assert await limits.admit("P") == 2.0
    limits.configure((Token(env="P", role="partner:kent",
                            rate_limit=RateLimit(per_s=0.5, burst=4)),))
    assert await limits.admit("P") is None
