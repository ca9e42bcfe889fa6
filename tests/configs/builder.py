"""Small configs for engine tests, built as YAML and loaded through the real validator, so a
test can never run on a config the router itself would refuse."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from router.config import RouterConfig, parse_config

RouteSpec = tuple[str, int] | tuple[str, int, int]  # (to, weight) or (to, weight, max_concurrent)


def force(fid: str, *, handlers: int = 10, overflow_queue: int = 2, max_queue: int = 5,
          aid_max: int = 10, aid_queue_below: int = 5, reserve_999: int = 0,
          on_cad_down: str = "keep", routes_999: Sequence[RouteSpec] = (),
          routes_101: Sequence[RouteSpec] = ()) -> dict[str, Any]:
    def routes(specs: Sequence[RouteSpec]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for spec in specs:
            # weight 0 here means a standby partner, as the config writes it
            route: dict[str, Any] = ({"to": spec[0], "weight": spec[1]} if spec[1]
                                     else {"to": spec[0], "standby": True})
            if len(spec) == 3:
                route["max_concurrent"] = spec[2]
            out.append(route)
        return out

    return {fid: {
        "name": f"{fid} police",
        "centre": {
            "handlers_on_duty": handlers, "overflow_queue": overflow_queue,
            "max_queue": max_queue, "on_cad_down": on_cad_down,
            "shed_101": {"queue": f"sip:101-queue@{fid}.example",
                         "announcement": f"sip:101-closed@{fid}.example"},
        },
        "sip": {"999": f"sip:999@{fid}.example", "101": f"sip:101@{fid}.example"},
        "cad": {"adapter": "sim"},
        "mutual_aid": {"max_concurrent": aid_max, "only_while_queue_below": aid_queue_below,
                       "reserve_999": reserve_999},
        "overflow": {"999": routes(routes_999), "101": routes(routes_101)},
    }}


def config(*forces: dict[str, Any], ramp: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
           step_s: float = 30.0) -> RouterConfig:
    merged: dict[str, Any] = {}
    for f in forces:
        merged.update(f)
    doc = {"version": 1, "health": {"recovery": {"ramp": list(ramp), "step_s": step_s}},
           "forces": merged}
    return parse_config(yaml.safe_dump(doc, sort_keys=False), "<test>")
