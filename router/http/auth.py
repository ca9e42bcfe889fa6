"""Bearer tokens with roles: telephony, viewer, manager, partner:FORCE.

Tokens are read from the environment variables the config names, never from the file itself.
A manager may do what a viewer may; a partner is bound to its own force.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import wraps

from aiohttp import web

from router.config import Token
from router.http.errors import fail

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

    @property
    def name(self) -> str:
        return f"partner:{self.force}" if self.force else self.role


class TokenBook:
    """Maps presented bearer tokens to principals, compared in constant time."""

    def __init__(self, tokens: tuple[Token, ...], environ: Mapping[str, str] = os.environ):
        self._entries: list[tuple[bytes, Principal]] = []
        self.load(tokens, environ)

    def load(self, tokens: tuple[Token, ...], environ: Mapping[str, str] = os.environ) -> None:
        """(Re)read the tokens, e.g. after a config reload; replaces every entry at once."""
        entries = []
        for token in tokens:
            secret = environ.get(token.env, "")
            if not secret:
                continue  # an unset variable grants nothing
            role, _, force = token.role.partition(":")
            entries.append((secret.encode(), Principal(role, force or None, token.env)))
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, presented: str) -> Principal | None:
        given = presented.encode()
        found = None
        for secret, principal in self._entries:
            if hmac.compare_digest(secret, given):
                found = principal
        return found


TOKENS = web.AppKey("tokens", TokenBook)
PRINCIPAL = web.RequestKey("principal", Principal)  # set by require() for the handler


def principal_of(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        fail(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
    principal = request.app[TOKENS].lookup(token.strip())
    if principal is None:
        fail(401, "unauthorized", "unknown token")
    return principal


def require(role: str) -> Callable[[Handler], Handler]:
    """Decorate a handler: only principals holding `role` (or one implying it) get in."""
    allowed = IMPLIED[role]

    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            principal = principal_of(request)
            if principal.role not in allowed:
                fail(403, "forbidden", f"role {principal.name} may not {request.method} "
                     f"{request.path} (needs {role})")
            request[PRINCIPAL] = principal
            return await handler(request)

        return guarded

    return wrap
