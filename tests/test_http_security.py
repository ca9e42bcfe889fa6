"""Signed handoffs, per-token rate limits and body-size limits, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from handoff_support import incident
from service_support import make_config, running_service

from router.config import Token
from router.http.auth import TokenBook
from router.http.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

KEY = "kent-signing-key-0123456789abcdef"
ENV = {"T_TEL": "tel", "T_KENT": "kent", "K_KENT": KEY, "T_ESSEX": "essex",
       "T_MANAGER": "manager"}
TOKENS = [
    {"env": "T_TEL", "role": "telephony"},
    {"env": "T_KENT", "role": "partner:kent", "signing_key_env": "K_KENT"},
    {"env": "T_ESSEX", "role": "partner:essex", "rate_limit": {"per_s": 0.2, "burst": 3},
     "max_body_bytes": 2048},
    {"env": "T_MANAGER", "role": "manager"},
]


@contextlib.asynccontextmanager
async def service(tmp: Path) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    path = make_config(tmp)
    raw = yaml.safe_load(path.read_text())
    raw["service"]["tokens"] = TOKENS
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with running_service(path, ENV) as api:
        yield api.base, api.session


async def post(session: aiohttp.ClientSession, url: str, token: str, body: bytes,
               **headers: str) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with session.post(url, data=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            **headers}) as resp:
        return resp.status, await resp.json(), resp.headers


def body_of(n: int, frm: str = "kent") -> bytes:
    return json.dumps(incident(n, frm=frm, to="met")).encode()


async def test_a_signing_partner_must_sign_each_handoff_freshly(tmp_path: Path) -> None:
    async with service(tmp_path) as (base, session):
        url = f"{base}/v1/handoffs"
        body = body_of(1)
        status, err, _ = await post(session, url, "kent", body)
        assert (status, err["error"]) == (401, "signature_required")

        now = int(time.time())
        good = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(KEY.encode(), now, body)}
        status, handoff, _ = await post(session, url, "kent", body, **good)
        assert status == 202, handoff

        # the same signature over a changed body: refused, and the change is not stored
        changed = body.replace(b'"P1"', b'"P4"')
        status, err, _ = await post(session, url, "kent", changed, **good)
        assert (status, err["error"]) == (401, "bad_signature")

        old = now - 3600
        stale = {TIMESTAMP_HEADER: str(old), SIGNATURE_HEADER: sign(KEY.encode(), old, body)}
        status, err, _ = await post(session, url, "kent", body, **stale)
        assert (status, err["error"]) == (401, "stale_signature")
        assert "window" in err["message"]

        # a replay inside the window is the duplicate it is: the same handoff, nothing new
        status, again, _ = await post(session, url, "kent", body, **good)
        assert (status, again["id"]) == (200, handoff["id"])

        # a partner without a key configured need not sign
        status, _, _ = await post(session, url, "essex", body_of(2, frm="essex"))
        assert status == 202


async def test_a_flooding_partner_gets_429_while_others_go_on(tmp_path: Path) -> None:
    async with service(tmp_path) as (base, session):
        url = f"{base}/v1/handoffs"
        statuses = []
        for n in range(5):
            status, err, headers = await post(session, url, "essex", body_of(n, frm="essex"))
            statuses.append(status)
        assert statuses == [202, 202, 202, 429, 429]
        assert err["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
        # telephony is never limited by default: 300 routes in a burst all answer
        async def route(i: int) -> int:
            async with session.post(f"{base}/v1/route", headers={"Authorization": "Bearer tel"},
                                    json={"call_id": f"c{i}", "service": "999",
                                          "origin": "met"}) as resp:
                return resp.status
        assert set(await asyncio.gather(*(route(i) for i in range(300)))) == {200}
        now = int(time.time())
        body = body_of(9)
        status, _, _ = await post(session, url, "kent", body, **{
            TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(KEY.encode(), now, body)})
        assert status == 202  # kent's bucket is its own


async def test_a_token_body_limit_is_enforced_before_parsing(tmp_path: Path) -> None:
    async with service(tmp_path) as (base, session):
        big = incident(1, frm="essex", to="met")
        big["summary"] = "x" * 3000
        status, err, _ = await post(session, f"{base}/v1/handoffs", "essex",
                                    json.dumps(big).encode())
        assert status == 413 and "2048" in err["message"]


def test_a_partner_whose_signing_key_is_unset_is_refused_not_let_in_unsigned(
        caplog: pytest.LogCaptureFixture) -> None:
    tokens = tuple(Token(**t) for t in TOKENS)  # type: ignore[arg-type]
    book = TokenBook(tokens, {k: v for k, v in ENV.items() if k != "K_KENT"})
    assert book.lookup("kent") is None and book.lookup("essex") is not None
    assert [t.env for t in book.missing] == ["T_KENT"]
    assert "signing key variable K_KENT of token T_KENT" in caplog.text
    signer = TokenBook(tokens, ENV).lookup("kent")
    assert signer is not None and signer.signing_key == KEY.encode()
    assert KEY not in repr(signer)  # a principal in a log line shows no key


async def test_basic_credentials_carry_a_token_for_the_same_principal(tmp_path: Path) -> None:
    """Kamailio's named connections send `Basic base64(user:token)` on a kept-alive
    connection: the password is the token, the user name anything, the role the token's."""
    def basic(user: str, password: str) -> dict[str, str]:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    async with service(tmp_path) as (base, session):
        url = f"{base}/v1/route?call_id=b1&service=999&origin=met&format=text"
        for user in ("telephony", "kamailio", ""):
            async with session.get(url, headers=basic(user, "tel")) as resp:
                assert resp.status == 200 and (await resp.text()).startswith("sip:")
        refused = [basic("tel", "wrong"), basic("tel", ""), {"Authorization": "Basic tel"},
                   {"Authorization": "Basic !!!"}, {"Authorization": "Digest tel"}]
        for headers in refused:
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 401, headers
        async with session.get(url, headers=basic("any", "manager")) as resp:
            assert resp.status == 403  # the manager's token, as Basic: still a manager
        async with session.get(f"{base}/v1/forces", headers=basic("x", "manager")) as resp:
            assert resp.status == 200
