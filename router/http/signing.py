"""Signed handoffs: an HMAC-SHA256 over the timestamp and the exact body a partner sent.

A partner whose token names a `signing_key_env` must send, with every `POST /v1/handoffs`,

    X-Overflow-Timestamp: 1764590400            (Unix seconds when it signed)
    X-Overflow-Signature: sha256=<hex of HMAC-SHA256(key, "<timestamp>." + body)>

The same scheme as Stripe's and Slack's webhooks, so partners can use code they already have.
A signature proves the body came from the holder of the key and was not changed on the way; the
timestamp, checked against a window either side of the router's clock, stops an old request
being replayed later (a replay inside the window is the same `(from, incident_id)` and is
answered as the duplicate it is).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE_HEADER = "X-Overflow-Signature"
TIMESTAMP_HEADER = "X-Overflow-Timestamp"
SCHEME = "sha256="
WINDOW_S = 300.0  # a timestamp this far either side of the router's clock is fresh


class SignatureError(Exception):
    """Why a signature was refused: `code` for the error body, `message` for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The X-Overflow-Signature value for `body` signed at `timestamp` (what partners do)."""
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify(key: bytes, headers: Mapping[str, str], body: bytes, *, now: float,
           window_s: float = WINDOW_S) -> None:
    """Raise SignatureError unless `headers` carry a fresh, valid signature of `body`."""
    stamp, given = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
    if not stamp or not given:
        missing = TIMESTAMP_HEADER if not stamp else SIGNATURE_HEADER
        raise SignatureError("signature_required", f"{missing}: this partner's handoffs must "
                             f"be signed ({SIGNATURE_HEADER} and {TIMESTAMP_HEADER})")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise SignatureError("bad_signature", f"{TIMESTAMP_HEADER}: must be whole Unix seconds")
    skew = now - int(stamp)
    if abs(skew) > window_s:
        raise SignatureError("stale_signature", f"{TIMESTAMP_HEADER}: signed {abs(skew):.0f} s "
                             f"{'ago' if skew > 0 else 'in the future'}; the window is "
                             f"{window_s:g} s either side of the router's clock")
    # compare in constant time, and the whole string, so nothing leaks about the right answer
    if not hmac.compare_digest(sign(key, int(stamp), body).encode(), given.strip().encode()):
        raise SignatureError("bad_signature", f"{SIGNATURE_HEADER}: does not match the body "
                             "(expected sha256=HEX of HMAC-SHA256(key, TIMESTAMP + '.' + body))")
