"""The control-room dashboard at `/`: one static page that reads the API with a viewer token."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

PAGE = Path(__file__).parent / "static" / "dashboard.html"


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", dashboard)
