"""The `overflow-router` command line (also `python -m router`)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from router.config import ConfigError, RouterConfig, load_config, load_config_checked
from router.engine.ledger import Ledger
from router.engine.model import CentreState, CentreView, Service, Snapshot, decision_record
from router.engine.policy import Policy
from router.infra.timefmt import iso

EXIT_CONFIG = 2

Command = Callable[[argparse.Namespace], int]


T = TypeVar("T")


def _pairs(values: Sequence[str], flag: str, convert: Callable[[str], T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for raw in values:
        force, sep, value = raw.partition("=")
        if not sep or not force:
            raise SystemExit(f"{flag}: expected FORCE=VALUE, got {raw!r}")
        try:
            out[force] = convert(value)
        except ValueError:
            raise SystemExit(f"{flag}: bad value {value!r} for {force}") from None
    return out


def _load(path: str) -> RouterConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg, warnings = load_config_checked(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: valid — {len(cfg.forces)} forces"
          + (f", {len(warnings)} warning{'s' * (len(warnings) != 1)}" if warnings else ""))
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"{'force':8} {'handlers':>8} {'queue':>9} {'aid cap':>9}  999 partners (weight) / 101")
    for fid, f in cfg.forces.items():
        c, aid = f.centre, f.mutual_aid
        routes = {
            s: " ".join(f"{r.to}({r.weight or 'standby'})" for r in f.overflow[s]) or "-"
            for s in Service
        }
        print(f"{fid:8} {c.handlers_on_duty:>8} {c.overflow_queue:>4}/{c.max_queue:<4} "
              f"{aid.max_concurrent:>4}/{aid.reserve_999:<4}  {routes[Service.EMERGENCY]} "
              f"/ {routes[Service.NON_EMERGENCY]}")
    tokens = ", ".join(f"{t.role}<-${t.env}" for t in cfg.service.tokens) or "none"
    print(f"tokens: {tokens}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    unknown = ({args.origin} | set(args.states) | set(args.loads)) - set(cfg.forces)
    if unknown:
        print(f"unknown force: {', '.join(sorted(unknown))} (known: {', '.join(cfg.forces)})",
              file=sys.stderr)
        return EXIT_CONFIG
    # a what-if starts from every centre normal; --state changes the ones asked about
    centres = {fid: CentreView(CentreState(args.states.get(fid, "normal"))) for fid in cfg.forces}
    snapshot = Snapshot(centres)
    ledger = Ledger()
    for fid, calls in args.loads.items():
        ledger.preload(fid, calls)
    policy = Policy(cfg)
    service = Service(args.service)
    decided_at = iso(time.time())
    for i in range(1, args.count + 1):
        call_id = f"whatif-{i}"
        decision = policy.decide(service, args.origin, snapshot, ledger, now=0.0)
        ledger.add(call_id, decision, now=0.0)  # simultaneous: each call stays in flight
        print(json.dumps(decision_record(decision, call_id, f"whatif-{i}", decided_at)))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from router.tools import simulate as sim

    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    try:
        scenario = sim.load_scenario(args.scenario, cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    strategies = args.strategy or list(sim.STRATEGIES)
    if args.sweep is not None:
        if args.seeds < 1:
            print("--seeds: must be at least 1", file=sys.stderr)
            return EXIT_CONFIG
        try:
            swept = sim.sweep(cfg, scenario, sim.parse_sweep(args.sweep),
                              [args.seed + i for i in range(args.seeds)], strategies)
        except sim.SweepError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        print(json.dumps(swept, allow_nan=False) if args.json else sim.sweep_table(swept))
        return 0
    report = sim.simulate(cfg, scenario, seed=args.seed, strategies=strategies)
    data = report.to_json()
    if args.html is not None:
        try:
            Path(args.html).write_text(sim.render_html(report), encoding="utf-8")
        except OSError as exc:
            print(f"--html: cannot write {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    print(json.dumps(data, allow_nan=False) if args.json else report.table(data))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from router.http.app import serve

    if _load(args.config) is None:
        return EXIT_CONFIG
    _logging()
    asyncio.run(serve(Path(args.config), args.host, args.port))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from router.tools.demo import Options, run_demo

    _logging("WARNING", "           %(name)s: %(message)s")  # the demo narrates; logs stay terse
    return asyncio.run(run_demo(options=Options(port=args.port, duration_s=args.duration,
                                                mqtt_port=args.mqtt_port)))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 if the audit log's hash chain holds, 1 naming its first break, 2 if unreadable."""
    from router.infra.audit import verify

    try:
        verdict = verify(Path(args.file))
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(verdict.summary())
    return 0 if verdict.intact else 1


def _admin(args: argparse.Namespace) -> int:
    from router.tools import admin
    try:
        if args.command == "status":
            out = asyncio.run(admin.status(args.url))
        elif args.command == "override":
            out = asyncio.run(admin.override(args.url, args.force, args.state, args.reason,
                                             args.minutes, args.operator))
        else:
            out = asyncio.run(admin.clear_override(args.url, args.force, args.operator))
    except admin.AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _logging(level: str = "INFO",
             fmt: str = "%(asctime)s %(levelname)-7s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=os.environ.get("OVERFLOW_LOG_LEVEL", level), format=fmt)


def _state(value: str) -> str:
    return CentreState(value).value


def _count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError(value)
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overflow-router",
        description="Automatic failover of 999 and 101 calls between forces.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config; exit 2 listing every error")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("route", help="offline what-if: where would the next N calls go?")
    p.add_argument("config")
    p.add_argument("--service", required=True, choices=[s.value for s in Service])
    p.add_argument("--origin", required=True)
    p.add_argument("--state", action="append", default=[], metavar="FORCE=STATE",
                   help=f"centre state ({', '.join(s.value for s in CentreState)}); default normal")
    p.add_argument("--load", action="append", default=[], metavar="FORCE=N",
                   help="calls already in flight at that force")
    p.add_argument("--count", type=int, default=1, help="simultaneous calls to decide")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("simulate", help="how long callers wait on a bad night: the router, "
                       "diversion by hand, and none, on the same callers")
    p.add_argument("--config", required=True)
    p.add_argument("--scenario", required=True, help="a scenario YAML, see scenarios/")
    p.add_argument("--seed", type=int, default=0, help="same seed, same report")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained page of charts")
    p.add_argument("--strategy", action="append", choices=["overflow-router", "manual", "none"],
                   help="only these (repeatable); default all three")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="run each value of a numeric config or scenario key over --seeds seeds")
    p.add_argument("--seeds", type=int, default=5, help="seeds per value of a sweep (from --seed)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run", help="the service")
    p.add_argument("--config", required=True)
    p.add_argument("--host", default=None, help="default: service.listen.host from the config")
    p.add_argument("--port", type=int, default=None, help="default: service.listen.port")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the service on simulated centres, with a Met outage")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--mqtt-port", type=int, default=None,
                   help="use the MQTT broker on this loopback port (default: start a private "
                        "mosquitto if installed; never a shared one unasked)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit", help="the audit log: check its hash chain")
    audit = p.add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="exit 0 if the chain holds, 1 naming its first break")
    p.add_argument("file")
    p.set_defaults(func=cmd_audit_verify)

    url = os.environ.get("OVERFLOW_URL", "http://127.0.0.1:8080")
    # who declares, recorded in the audit log: OVERFLOW_OPERATOR, else the login name
    operator = os.environ.get("OVERFLOW_OPERATOR") or _login()
    operator_help = "who is declaring (default: $OVERFLOW_OPERATOR, else your login name)"
    p = sub.add_parser("status", help="state of every centre and where 999 calls go")
    p.add_argument("--url", default=url)
    p.set_defaults(func=_admin)
    p = sub.add_parser("override", help="declare a centre's state (manager)")
    p.add_argument("force")
    p.add_argument("state", choices=[s.value for s in CentreState if s is not CentreState.UNKNOWN])
    p.add_argument("--reason", required=True)
    p.add_argument("--for", dest="minutes", type=float, default=None, metavar="MINUTES")
    p.add_argument("--url", default=url)
    p.add_argument("--operator", default=operator, help=operator_help)
    p.set_defaults(func=_admin)
    p = sub.add_parser("clear-override", help="end a declaration (manager)")
    p.add_argument("force")
    p.add_argument("--url", default=url)
    p.add_argument("--operator", default=operator, help=operator_help)
    p.set_defaults(func=_admin)
    return parser


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no name: the router will ask
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "route":
        args.states = _pairs(args.state, "--state", _state)
        args.loads = _pairs(args.load, "--load", _count)
        if args.count < 1:
            parser.error("--count must be at least 1")
    func: Command = args.func
    try:
        return func(args)
    except BrokenPipeError:  # `validate ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
