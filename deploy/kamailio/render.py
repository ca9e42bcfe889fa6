"""Write a ready-to-run Kamailio config directory for overflow-router from forces.yaml.

    python deploy/kamailio/render.py config/forces.yaml --out /etc/kamailio/overflow \\
        --listen udp:10.0.0.5:5060 --router http://127.0.0.1:8080
    kamailio -DD -E -f /etc/kamailio/overflow/kamailio.cfg

kamailio.cfg is copied unchanged; everything that varies per deployment goes into the three
files it includes: `overflow-local.cfg` (defines), `overflow-tables.cfg` (static tables) and
`overflow-routers.cfg` (one http_client connection per router, defined from the environment).
The tables come from the same forces.yaml the router reads, so the proxy's fallback can never
disagree with the router about where a force's own centre is. `home` maps origin:service to
the force's own SIP URI and `alt` to its highest-weighted overflow partner's; the proxy uses
them when the router is silent or a destination fails.
No secret is written: each router's connection, HTTP Basic credentials included, is read from
the environment when Kamailio starts (`OVERFLOW_ROUTER_HTTPCON_1`, `_2`, ...: Kamailio's
preprocessor cannot splice a variable into the middle of a string). `--print-env` prints those
variables from the telephony token in the environment, for a unit file's EnvironmentFile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

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
    router_urls: tuple[str, ...]  # asked in order; none: every call goes home (a baseline)
    token_env: str = "OVERFLOW_TOKEN_TELEPHONY"
    httpcon_env: str = "OVERFLOW_ROUTER_HTTPCON"  # + _1, _2, ...: each router's connection
    router_timeout_s: int = 1  # http_client in Kamailio 5.6 takes whole seconds
    relay_timeout_ms: int = 1500
    route_workers: int = 8
    breaker_s: int = 5  # after a router failure, calls go home without asking this long; 0: off
    children: int = 4
    plan_max_age_s: int = 300  # a router's answer is used without it this long at most
    keepalive: bool = True  # False: a new TCP connection per query (a benchmark baseline)

    def __post_init__(self) -> None:
        if not LISTEN.match(self.listen):
            raise ValueError(f"listen: expected udp:HOST:PORT, got {self.listen!r}")
        if len(self.router_urls) > 3:
            raise ValueError("router: at most 3 (kamailio.cfg has a connection for each)")
        for url in self.router_urls:
            if not URL.match(url) or "@" in url or ";" in url:
                raise ValueError(f"router: expected an http(s)://HOST:PORT URL, got {url!r}")
        if self.router_timeout_s < 1 or self.relay_timeout_ms < 100:
            raise ValueError("timeouts: the router's is at least 1 s, a relay's at least 100 ms")
        if self.breaker_s < 0:
            raise ValueError(f"breaker-s: 0 (off) or more, got {self.breaker_s}")
        for name in (self.token_env, self.httpcon_env):
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
                raise ValueError(f"not an environment variable name: {name!r}")
        if self.plan_max_age_s < 1:
            raise ValueError(f"plan-max-age-s: at least 1, got {self.plan_max_age_s}")


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
        # substdef: it is used inside a string (the plan table's autoexpire)
        f'#!substdef "!PLAN_MAX_AGE_S!{edge.plan_max_age_s}!g"',
    ]
    if edge.router_urls:
        lines += ["#!define WITH_ROUTER", f"#!define ROUTERS {len(edge.router_urls)}"]
        if not edge.keepalive:
            lines.append("#!define NO_KEEPALIVE")
    return "\n".join([*lines, ""])


def render_routers(edge: EdgeSettings) -> str:
    """One named http_client connection per router, router1, router2, ..., each defined whole
    by an environment variable (it holds the token), in the order they are asked."""
    lines = [HEADER]
    for n, url in enumerate(edge.router_urls, 1):
        lines += [f"# router{n}: {url}, defined by ${edge.httpcon_env}_{n}",
                  f"#!defenvs ROUTER_CON_{n}={edge.httpcon_env}_{n}",
                  f'modparam("http_client", "httpcon", ROUTER_CON_{n})']
    return "\n".join([*lines, ""])


def httpcon_env(edge: EdgeSettings, token: str, user: str = "telephony") -> dict[str, str]:
    """The environment Kamailio needs: each router's named connection with HTTP Basic
    credentials, the token as the password (percent-encoded: curl decodes it)."""
    out = {}
    for n, url in enumerate(edge.router_urls, 1):
        parts = urlsplit(url.rstrip("/"))
        userinfo = f"{quote(user, safe='')}:{quote(token, safe='')}"
        out[f"{edge.httpcon_env}_{n}"] = (
            f"router{n}=>{parts.scheme}://{userinfo}@{parts.netloc}{parts.path}")
    return out


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
    (out / "overflow-routers.cfg").write_text(render_routers(edge), encoding="utf-8")
    return main


def _telephony_env(config: RouterConfig) -> str | None:
    return next((t.env for t in config.service.tokens if t.role == "telephony"), None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the router's forces.yaml")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--listen", default="udp:127.0.0.1:5060")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--router", action="append",
                       help="a router's base URL, e.g. http://127.0.0.1:8080; give it again "
                       "for a second router, asked when the first fails")
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
    parser.add_argument("--plan-max-age-s", type=int, default=300,
                        help="with no router answering, calls follow the routers' answers of "
                        "at most this age (seconds), then go home; default 300")
    parser.add_argument("--httpcon-env", default="OVERFLOW_ROUTER_HTTPCON",
                        help="prefix of the variables defining each router's connection")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="a new TCP connection per router query (a benchmark baseline)")
    parser.add_argument("--print-env", action="store_true",
                        help="print those variables (from the token in the environment) "
                        "instead of writing files")
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
            listen=args.listen, router_urls=() if args.static else tuple(args.router),
            token_env=token_env or "UNUSED", httpcon_env=args.httpcon_env,
            router_timeout_s=args.router_timeout_s, relay_timeout_ms=args.relay_timeout_ms,
            route_workers=args.route_workers, breaker_s=args.breaker_s,
            children=args.children, plan_max_age_s=args.plan_max_age_s,
            keepalive=not args.no_keepalive,
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.print_env:
        token = os.environ.get(edge.token_env, "")
        if not token:
            print(f"--print-env: {edge.token_env} is not set", file=sys.stderr)
            return 2
        for name, value in httpcon_env(edge, token).items():
            print(f"{name}='{value}'")
        return 0
    print(write_dir(config, edge, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
