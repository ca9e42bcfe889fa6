"""This router's name among several sharing one database and broker: who holds a handoff's
claim, the leader's lease, and whose calls a peer's counts are."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def instance_name(environ: Mapping[str, str] = os.environ) -> str:
    """`OVERFLOW_INSTANCE` (a pod or unit name, stable across restarts), else host and pid,
    unique among routers running now but new at each start."""
    return environ.get("OVERFLOW_INSTANCE", "").strip() or f"{socket.gethostname()}:{os.getpid()}"
