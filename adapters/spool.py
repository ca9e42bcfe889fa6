"""Handoffs as files, for manual handling: one JSON file per incident in a folder the
destination's control room watches (or prints). Written atomically (temporary file, fsync,
rename), so a reader never sees half a file and a retry simply rewrites the same name.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from adapters.base import Ack, AdapterContext, AdapterOptions, Delivery, Outcome
from router.infra.files import write_atomically


class SpoolOptions(AdapterOptions):
    directory: str | None = None  # default: {handoff.spool_dir}/outbox/{force}


class SpoolAdapter:
    Options = SpoolOptions

    def __init__(self, options: SpoolOptions, context: AdapterContext):
        self.directory = (Path(options.directory) if options.directory
                          else context.spool_dir / "outbox" / context.force)

    def path_for(self, delivery: Delivery) -> Path:
        return self.directory / f"{delivery.key}.json"

    async def deliver(self, delivery: Delivery) -> Outcome:
        path = self.path_for(delivery)
        duplicate = path.exists()
        data = json.dumps({"key": delivery.key, "incident": dict(delivery.incident)},
                          indent=2).encode()
        await asyncio.to_thread(write_atomically, path, data)  # fsync must not block the loop
        return Ack(reference=str(path), duplicate=duplicate)

    async def aclose(self) -> None:
        return None
