"""Run every benchmark, or those named:
`python -m bench [engine failover service handoff acknowledge sip sim instances]`."""

from __future__ import annotations

import importlib
import sys

ALL = ("engine", "failover", "service", "handoff", "acknowledge", "sip", "sim", "instances")


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    status = 0
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            print(f"bench {name}: not present, skipped")
            continue
        print(f"\n=== bench {name} ===", flush=True)
        status |= int(module.main([]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
