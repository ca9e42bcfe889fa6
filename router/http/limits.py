"""Per-token rate limits: one leaky bucket per credential, so a partner that floods the
router (by bug or by malice) is slowed with 429s while every other caller goes on.

Telephony is unlimited unless the config says otherwise: refusing a route would leave a 999
caller without a destination, which is worse than any load the router could be put under.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter

from router.config import Token
from router.config.schema import RateLimit

ROLE_DEFAULTS: dict[str, RateLimit | None] = {
    "telephony": None,
    "partner": RateLimit(per_s=100, burst=200),  # a busy night's handoffs, with room for bursts
    "viewer": RateLimit(per_s=50, burst=100),  # dashboards poll every few seconds
    "manager": RateLimit(per_s=50, burst=100),
}


def limit_of(token: Token) -> RateLimit | None:
    if token.rate_limit == "off":
        return None
    return token.rate_limit or ROLE_DEFAULTS[token.role.partition(":")[0]]


class RateLimits:
    """Buckets by token variable name; `admit` says how long to wait when one is empty."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[RateLimit, AsyncLimiter]] = {}

    def configure(self, tokens: tuple[Token, ...]) -> None:
        """(Re)build after a reload; a bucket whose limit did not change keeps its level."""
        buckets = {}
        for token in tokens:
            limit = limit_of(token)
            if limit is None:
                continue
            kept = self._buckets.get(token.env)
            buckets[token.env] = kept if kept and kept[0] == limit else (
                limit, AsyncLimiter(limit.burst, limit.burst / limit.per_s))
        self._buckets = buckets

    async def admit(self, env: str) -> float | None:
        """None when the request may go on; else the seconds to tell it to retry after."""
        bucket = self._buckets.get(env)
        if bucket is None:
            return None
        limit, limiter = bucket
        if not limiter.has_capacity():
            return max(1.0, math.ceil(1 / limit.per_s))
        await limiter.acquire()  # has capacity: returns at once
        return None
