"""Write a ready-to-run Kamailio config directory for overflow-router from forces.yaml.

    python deploy/kamailio/render.py config/forces.yaml --out /etc/kamailio/overflow \\
        --listen udp:10.0.0.5:5060 --router http://127.0.0.1:8080
    kamailio -DD -E -f /etc/kamailio/overflow/kamailio.cfg

kamailio.cfg is copied unchanged; everything that varies per deployment goes into the two
files it includes: `overflow-local.cfg` (defines) and `overflow-tables.cfg` (static tables).
The tables come from the same forces.yaml the router reads, so the proxy's fallback can never
disagree with the router about where a force's own centre is. `home` maps origin:service to
the force's own SIP URI and `alt` to its highest-weighted overflow partner's; the proxy uses
them when the router is silent or a destination fails.
No secret is written: the proxy reads the telephony token from the environment at run time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

from router.config import ConfigError, RouterConfig, load_config  # noqa: E402
from router.engine.model import Service  # noqa: E402

LISTEN = re.compile(r"^udp:[^\s:]+:\d{1,5}$")
URL = re.compile(r"^https?://[^\s\"]+$")


@dataclass(frozen=True)
class EdgeSettings:
    """What differs between one Kamailio deployment (or test run) and another."""

    listen: str  # udp:HOST:PORT
    router_url: str | None  # None: no router at all, every call goes home (a baseline)
    token_env: str = "OVERFLOW_TOKEN_TELEPHONY"
    router_timeout_s: int = 1  # http_client in Kamailio 5.6 takes whole seconds
    relay_timeout_ms: int = 1500
    route_workers: int = 8
    breaker_s: int = 5  # after a router failure, calls go home without asking this long; 0: off
    children: int = 4

    def __post_init__(self) -> None:
        if not LISTEN.match(self.listen):
            raise ValueError(f"listen: expected udp:HOST:PORT, got {self.listen!r}")
        if self.router_url is not None and not URL.match(self.router_url):
            raise ValueError(f"router: expected an http(s):// URL, got {self.router_url!r}")
        if self.router_timeout_s < 1 or self.relay_timeout_ms < 100:
            raise ValueError("timeouts: the router's is at least 1 s, a relay's at least 100 ms")
        if self.breaker_s < 0:
            raise ValueError(f"breaker-s: 0 (off) or more, got {self.breaker_s}")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.token_env):
            raise ValueError(f"token-env: not an environment variable name: {self.token_env!r}")


def tables(config: RouterConfig) -> dict[str, dict[str, str]]:
    """`home` and `alt` keyed `origin:service`."""
    home: dict[str, str] = {}
    alt: dict[str, str] = {}
    for origin, force in config.forces.items():
        for service in Service:
            key = f"{origin}:{service.value}"
            home[key] = force.sip[service]
            routes = [r for r in force.overflow[service] if r.weight > 0]
            if routes:
                best = max(routes, key=lambda r: r.weight)  # first of equals: max keeps it
                alt[key] = config.forces[best.to].sip[service]
    return {"home": home, "alt": alt}


HEADER = "# Written by deploy/kamailio/render.py: edit forces.yaml or the options, not this file."


def render_local(edge: EdgeSettings) -> str:
    """The defines kamailio.cfg reads before anything else."""
    lines = [
        HEADER,
        f"#!define LISTEN {edge.listen}",
        f"#!define ROUTER_TIMEOUT_S {edge.router_timeout_s}",
        f"#!define RELAY_TIMEOUT_MS {edge.relay_timeout_ms}",
        # substdef: it is used inside a string (async_workers_group), where defines do not reach
        f'#!substdef "!ROUTE_WORKERS!{edge.route_workers}!g"',
        f"#!define BREAKER_S {edge.breaker_s}" if edge.breaker_s else "#!define NO_BREAKER",
        f"#!define SIP_CHILDREN {edge.children}",
    ]
    if edge.router_url is not None:
        lines += [
            "#!define WITH_ROUTER",
            f'#!define ROUTER_URL "{edge.router_url.rstrip("/")}"',
            # substdef again: the name is used inside $env(...)
            f'#!substdef "!ROUTER_TOKEN_ENV!{edge.token_env}!g"',
        ]
    return "\n".join([*lines, ""])


def render_tables(config: RouterConfig) -> str:
    """The static tables, loaded into htable when Kamailio starts."""
    lines = [HEADER, "event_route[htable:mod-init] {"]
    for table, entries in tables(config).items():
        for key, uri in entries.items():
            lines.append(f'\t$sht({table}=>{key}) = "{uri}";')
    lines += ["}", ""]
    return "\n".join(lines)


def write_dir(config: RouterConfig, edge: EdgeSettings, out: Path) -> Path:
    """Write kamailio.cfg and the two files it includes into `out`; return the main file."""
    out.mkdir(parents=True, exist_ok=True)
    main = out / "kamailio.cfg"
    shutil.copyfile(HERE / "kamailio.cfg", main)
    (out / "overflow-local.cfg").write_text(render_local(edge), encoding="utf-8")
    (out / "overflow-tables.cfg").write_text(render_tables(config), encoding="utf-8")
    return main


def _telephony_env(config: RouterConfig) -> str | None:
    return next((t.env for t in config.service.tokens if t.role == "telephony"), None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the router's forces.yaml")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--listen", default="udp:127.0.0.1:5060")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--router", help="the router's base URL, e.g. http://127.0.0.1:8080")
    group.add_argument("--static", action="store_true",
                       help="no router: every call goes to its home centre (a baseline)")
    parser.add_argument("--token-env", help="variable holding the telephony token "
                        "(default: the config's telephony token variable)")
    parser.add_argument("--router-timeout-s", type=int, default=1,
                        help="whole seconds (Kamailio 5.6 http_client); default 1")
    parser.add_argument("--relay-timeout-ms", type=int, default=1500)
    parser.add_argument("--route-workers", type=int, default=8)
    parser.add_argument("--breaker-s", type=int, default=5,
                        help="after the router fails, calls go home without asking this long "
                        "(seconds; 0 turns the breaker off, a benchmark baseline)")
    parser.add_argument("--children", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    token_env = args.token_env or _telephony_env(config)
    if not args.static and token_env is None:
        print(f"{args.config}: no token with role telephony: give --token-env", file=sys.stderr)
        return 2
    try:
        edge = EdgeSettings(
            listen=args.listen, router_url=None if args.static else args.router,
            token_env=token_env or "UNUSED", router_timeout_s=args.router_timeout_s,
            relay_timeout_ms=args.relay_timeout_ms, route_workers=args.route_workers,
            breaker_s=args.breaker_s, children=args.children,
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(write_dir(config, edge, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
