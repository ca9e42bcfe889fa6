"""Adapters are discovered through Python entry points: a separately packaged adapter
(tests/adapter_pkg) is made installed for the test with a real dist-info, then removed."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from handoff_support import incident, make_config

from adapters import base
from router.handoff.desk import open_desk
from router.handoff.incident import Incident

PKG = Path(__file__).resolve().parent / "adapter_pkg"


@pytest.fixture
def echo_installed(tmp_path: Path) -> Iterator[None]:
    """What `pip install tests/adapter_pkg` leaves behind, minus the copying: a dist-info
    with the entry point on sys.path, next to the package's source."""
    site = tmp_path / "site"
    info = site / "overflow_echo_adapter-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: overflow-echo-adapter\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        '[overflow_router.adapters]\necho = overflow_echo_adapter:EchoAdapter\n')
    sys.path[:0] = [str(site), str(PKG)]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in (str(site), str(PKG)):
            sys.path.remove(entry)
        sys.modules.pop("overflow_echo_adapter", None)
        importlib.invalidate_caches()


def test_unknown_before_install_known_after(echo_installed: None) -> None:
    assert base.available()["echo"] == "overflow_echo_adapter:EchoAdapter"
    assert base.load("echo").Options.__name__ == "EchoOptions"
    assert base.check({"met": ("echo", {"prefix": 7})}) and not base.check(
        {"met": ("echo", {"prefix": "X-"})})


def test_uninstalled_adapter_is_unknown() -> None:
    assert "echo" not in base.available()
    with pytest.raises(base.AdapterConfigError, match="unknown adapter 'echo'"):
        base.load("echo")


async def test_desk_delivers_through_the_discovered_adapter(echo_installed: None,
                                                            tmp_path: Path) -> None:
    config = make_config(tmp_path, cads={"met": {"adapter": "echo",
                                                 "options": {"prefix": "MET-CAD/"}}})
    async with open_desk(config, alert=lambda a: None, cad_up=lambda f: True) as desk:
        handoff, _ = await desk.submit(Incident.model_validate(incident(1)))
        for _ in range(200):
            found = await desk.get(handoff["id"])
            if found and found["status"] == "delivered":
                break
            await asyncio.sleep(0.01)
    assert found is not None and found["status"] == "delivered"
    assert "MET-CAD/KENT-000001" in found["history"][-1]["detail"]
    echo = sys.modules["overflow_echo_adapter"]
    assert handoff["id"] in echo.EchoAdapter.seen
