"""`GET /v1/audit`: the latest audit records, for the dashboard's timeline (state changes,
declarations, clears, expiries, reloads, escalations, answers, handoffs handled on paper),
with who, why and source. The file is the audit log itself (router.infra.audit), read from
its end in a thread: a long log must neither be read whole nor block the event loop."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.config import FORCE_ID
from router.http.auth import require
from router.http.errors import query_params, validate
from router.http.state import runtime

MAX_LIMIT = 500
CHUNK = 64 * 1024
SYNC_TIMEOUT_S = 1.0  # for the audit writer to append what is queued (an fsync or two)


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 100
    kind: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")] | None = None
    force: Annotated[str, Field(pattern=FORCE_ID)] | None = None


def tail(path: Path, limit: int, kind: str | None = None,
         force: str | None = None) -> list[dict[str, Any]]:
    """The last `limit` records of `path` that match, newest first. Reads backwards a chunk
    at a time; a torn or unparseable line is skipped (`audit verify` is what judges them)."""
    out: list[dict[str, Any]] = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return out
    with os.fdopen(fd, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        rest = b""
        while end > 0 and len(out) < limit:
            start = max(end - CHUNK, 0)
            f.seek(start)
            block = f.read(end - start) + rest
            end = start
            lines = block.split(b"\n")
            rest = lines.pop(0) if start > 0 else b""
            for line in reversed(lines):
                record = _parse(line)
                if record is not None and _matches(record, kind, force):
                    out.append(record)
                    if len(out) >= limit:
                        break
    return out


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _matches(record: dict[str, Any], kind: str | None, force: str | None) -> bool:
    return (kind is None or record.get("kind") == kind) and (
        force is None or record.get("force") == force)


@require("viewer")
async def get_audit(request: web.Request) -> web.Response:
    query = validate(AuditQuery, query_params(request))
    rt = runtime(request)
    path = rt.audit.path if rt.audit is not None else Path(rt.config.service.audit_log)
    if rt.audit is not None:  # what was recorded before this request is in the file
        await asyncio.to_thread(rt.audit.sync, SYNC_TIMEOUT_S)
    records = await asyncio.to_thread(tail, path, query.limit, query.kind, query.force)
    return web.json_response({"records": records, "count": len(records)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit", get_audit)
