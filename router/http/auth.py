"""Bearer tokens with roles: telephony, viewer, manager, partner:FORCE.

A token may also be presented as HTTP Basic credentials, the token being the password (any
user name): Kamailio's named http_client connections can send those on a kept-alive
connection, where they cannot add an `Authorization: Bearer` header.

Tokens (and partners' signing keys) are read from the environment variables the config names,
never from the file itself. A manager may do what a viewer may; a partner is bound to its own
force. Each token may also be bound to a client certificate (mutual TLS), and has its own rate
limit and body-size limit, so one caller's flood or bulk cannot crowd out the others.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import wraps

from aiohttp import web

from router.config import Token
from router.http.errors import BODY_LIMIT, fail
from router.http.limits import RateLimits
from router.http.tls import peer_common_name

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# which roles satisfy a required one
IMPLIED: Mapping[str, frozenset[str]] = {
    "viewer": frozenset({"viewer", "manager"}),
    "manager": frozenset({"manager"}),
    "telephony": frozenset({"telephony"}),
    "partner": frozenset({"partner"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    role: str  # telephony | viewer | manager | partner
    force: str | None = None  # for partners: the force the token speaks for
    env: str = ""  # which variable the token came from, for the audit log
    signing_key: bytes | None = field(default=None, repr=False)  # partners who must sign
    max_body_bytes: int | None = None  # None: the service's default
    client_cert: str | None = None  # mutual TLS: the verified client certificate's CN
    operator: str | None = None  # the person a manager's token belongs to, if one

    @property
    def name(self) -> str:
        return f"partner:{self.force}" if self.force else self.role


class TokenBook:
    """Maps presented bearer tokens to principals, compared in constant time."""

    def __init__(self, tokens: tuple[Token, ...], environ: Mapping[str, str] = os.environ):
        self._entries: list[tuple[bytes, Principal]] = []
        self.missing: tuple[Token, ...] = ()  # named by the config, unset in the environment
        self.limits = RateLimits()
        self.load(tokens, environ)

    def load(self, tokens: tuple[Token, ...], environ: Mapping[str, str] = os.environ) -> None:
        """(Re)read the tokens, e.g. after a config reload; replaces every entry at once.
        Says which variables are unset: the service still starts (health and metrics need no
        token), but whoever relies on one would otherwise only learn it from a 401."""
        entries, missing = [], []
        for token in tokens:
            secret = environ.get(token.env, "")
            key = environ.get(token.signing_key_env, "") if token.signing_key_env else None
            if not secret:
                log.warning("token variable %s (role %s) is not set: it grants nothing",
                            token.env, token.role)
            elif key == "":  # fail closed: unsigned handoffs must not pass for signed ones
                log.warning("signing key variable %s of token %s (role %s) is not set: the "
                            "token grants nothing", token.signing_key_env, token.env,
                            token.role)
            else:
                role, _, force = token.role.partition(":")
                entries.append((_bytes(secret), Principal(
                    role, force or None, token.env, _bytes(key) if key else None,
                    token.max_body_bytes, token.client_cert, token.operator)))
                continue
            missing.append(token)
        self._entries = entries
        self.missing = tuple(missing)
        self.limits.configure(tokens)
        if not entries:
            log.error("no API token is set (%s): every /v1 request will be refused; health "
                      "and metrics still answer", ", ".join(t.env for t in tokens)
                      or "the config names none")

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, presented: str) -> Principal | None:
        given = _bytes(presented)
        found = None
        for secret, principal in self._entries:
            if hmac.compare_digest(secret, given):
                found = principal
        return found


def _bytes(text: str) -> bytes:
    """As received: header values and the environment carry undecodable bytes as surrogates."""
    return text.encode("utf-8", "surrogateescape")


TOKENS = web.AppKey("tokens", TokenBook)
PRINCIPAL = web.RequestKey("principal", Principal)  # set by require() for the handler


def principal_of(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        token = _basic_password(token.strip())
    elif scheme != "bearer":
        token = ""
    if not token.strip():
        fail(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN, or "
             "Basic credentials whose password is the token)")
    principal = request.app[TOKENS].lookup(token.strip())
    if principal is None:
        fail(401, "unauthorized", "unknown token")
    if principal.client_cert is not None and peer_common_name(request) != principal.client_cert:
        # the same 401 as an unknown token: a stolen token alone must not confirm it is valid
        fail(401, "unauthorized", "unknown token, or not presented with its client certificate")
    return principal


def _basic_password(credentials: str) -> str:
    """The password of `Basic base64(user:password)`; "" when it is not that. The user name is
    not checked: the password alone is the token."""
    try:
        decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return ""
    _, colon, password = decoded.partition(b":")
    return password.decode("utf-8", "surrogateescape") if colon else ""


def require(*roles: str) -> Callable[[Handler], Handler]:
    """Decorate a handler: only principals holding one of `roles` (or one implying it) get in."""
    allowed = frozenset().union(*(IMPLIED[role] for role in roles))
    needs = " or ".join(roles)

    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            principal = principal_of(request)
            if principal.role not in allowed:
                fail(403, "forbidden", f"role {principal.name} may not {request.method} "
                     f"{request.path} (needs {needs})")
            wait = await request.app[TOKENS].limits.admit(principal.env)
            if wait is not None:
                fail(429, "rate_limited", f"{principal.name} is over its rate limit; retry "
                     f"after {wait:g} s", headers={"Retry-After": f"{wait:.0f}"})
            request[PRINCIPAL] = principal
            if principal.max_body_bytes is not None:
                request[BODY_LIMIT] = principal.max_body_bytes
            return await handler(request)

        return guarded

    return wrap
