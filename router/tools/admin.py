"""The admin client behind `overflow-router status | override | clear-override`.

Talks to a running service over HTTP with the token in OVERFLOW_TOKEN; prints what a
control-room manager needs to read at a glance.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=10)


class AdminError(Exception):
    pass


async def call(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    token = os.environ.get("OVERFLOW_TOKEN", "")
    if not token:
        raise AdminError("set OVERFLOW_TOKEN to a viewer or manager token")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.request(
            method, url.rstrip("/") + path, json=body, headers=headers
        ) as resp:
            text = await resp.text()
            data = json.loads(text) if text else {}
            if resp.status >= 400:
                message = data.get("message", text)
                raise AdminError(f"{resp.status} {data.get('error', '')}: {message}")
            return data
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AdminError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


def format_status(forces: dict[str, Any], routing: dict[str, Any]) -> str:
    lines = []
    if forces.get("fail_static"):
        lines.append("!! evidence lost: routing on the last known-good plan")
    lines.append(f"{'force':8} {'state':30} {'tel':4} {'cad':4} {'calls':>6} {'aid':>4}  "
                 f"999 now goes to")
    for fid, f in forces["forces"].items():
        shares = routing["routing"].get(fid, {}).get("999", [])
        where = ", ".join(f"{s['destination']} {round(s['share'] * 100)}%" for s in shares)
        override = f"  [declared {f['override']['state']}: {f['override']['reason']}]" \
            if f.get("override") else ""
        # the router's own words: "diverting — CAD down" while a normal centre's calls go away
        headline = f.get("headline") or f.get("state", "?")
        lines.append(f"{fid:8} {headline:30} {_yn(f.get('telephony_up')):4} "
                     f"{_yn(f.get('cad_up')):4} {f['calls_in_flight']:>6} {f['aid_in_flight']:>4}"
                     f"  {where}{override}")
    return "\n".join(lines)


def _yn(value: Any) -> str:
    return {True: "up", False: "DOWN"}.get(value, "?")


async def status(url: str) -> str:
    forces = await call(url, "GET", "/v1/forces")
    routing = await call(url, "GET", "/v1/routing-table")
    return format_status(forces, routing)


async def override(url: str, force: str, state: str, reason: str, minutes: float | None,
                   operator: str | None) -> str:
    body: dict[str, Any] = {"state": state, "reason": reason}
    if operator:
        body["operator"] = operator
    if minutes is not None:
        body["expires_in_s"] = minutes * 60
    data = await call(url, "PUT", f"/v1/forces/{force}/override", body)
    return f"{force} declared {state} ({reason}); state now {data.get('state')}"


async def clear_override(url: str, force: str, operator: str | None) -> str:
    query = f"?{urllib.parse.urlencode({'operator': operator})}" if operator else ""
    data = await call(url, "DELETE", f"/v1/forces/{force}/override{query}")
    done = "cleared" if data.get("cleared") else "had no declaration"
    return f"{force} {done}; state now {data.get('state')}"
