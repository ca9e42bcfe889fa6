"""Load and validate `forces.yaml`.

Validation happens once, here, where the file enters: every error is reported as
`FILE:LINE: key.path: message`, all of them at once, so a manager fixes a config in one pass.
The rest of the router only ever sees a `RouterConfig` that passed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from router.config.schema import RouterConfig
from router.config.yamldoc import (
    ConfigError,
    ConfigIssue,
    Path_,
    YamlTree,
    parse_document_checked,
)
from router.engine.model import Service

log = logging.getLogger(__name__)


def _semantic_issues(tree: YamlTree, cfg: RouterConfig) -> Iterable[ConfigIssue]:
    """Cross-references pydantic cannot see: routes must name real partners that help."""
    known = ", ".join(sorted(cfg.forces))
    for origin, force in cfg.forces.items():
        for service, routes in force.overflow.items():
            base: Path_ = ("forces", origin, "overflow", service.value)
            seen: set[str] = set()
            for i, route in enumerate(routes):
                where = (*base, i, "to")
                partner = cfg.forces.get(route.to)
                if route.to == origin:
                    yield tree.issue(where, f"routes to itself ({origin})")
                elif partner is None:
                    yield tree.issue(where, f"unknown force {route.to!r} (known: {known})")
                elif route.to in seen:
                    yield tree.issue(where, f"{route.to} is listed twice")
                elif service not in partner.mutual_aid.services:
                    yield tree.issue(
                        where, f"{route.to} gives no mutual aid for {service.value} "
                        f"(forces.{route.to}.mutual_aid.services)"
                    )
                elif partner.sip[service] == force.sip[service]:
                    yield tree.issue(
                        where, f"{route.to}'s {service.value} destination {partner.sip[service]} "
                        f"is {origin}'s own: the call would bounce back (cycle)"
                    )
                seen.add(route.to)
    from adapters.base import option_problems  # each adapter owns its options' model

    for fid, force in cfg.forces.items():
        for where, message in option_problems(force.cad.adapter, force.cad.options):
            yield tree.issue(("forces", fid, "cad", *where), message)
    for i, token in enumerate(cfg.service.tokens):
        role = token.role
        if role.startswith("partner:") and role.removeprefix("partner:") not in cfg.forces:
            yield tree.issue(("service", "tokens", i, "role"),
                             f"{role!r} names an unknown force (known: {known})")
        tls = cfg.service.listen.tls
        if token.client_cert is not None and (tls is None or tls.client_cert == "none"):
            yield tree.issue(("service", "tokens", i, "client_cert"),
                             "needs service.listen.tls with client_ca_file and client_cert: "
                             "optional or required")


def _warnings(tree: YamlTree, cfg: RouterConfig) -> Iterable[ConfigIssue]:
    """Valid but probably not meant: said by `validate` and logged by the service."""
    for fid, force in cfg.forces.items():
        if not force.centre.probes and not force.centre.telemetry:
            yield tree.issue(("forces", fid, "centre", "telemetry"),
                             "off, and there are no probes: only a manager's declaration can "
                             f"ever tell the router {fid}'s state")
        if not force.overflow[Service.EMERGENCY]:
            yield tree.issue(("forces", fid, "overflow", "999"),
                             f"no partners: if {fid}'s centre fails, its 999 calls can only go "
                             "home as last resort")


def parse_config_checked(text: str, file: str = "<config>"
                         ) -> tuple[RouterConfig, list[ConfigIssue]]:
    """The config and its warnings; raises ConfigError with every error."""
    return parse_document_checked(text, file, RouterConfig, _semantic_issues, _warnings)


def parse_config(text: str, file: str = "<config>") -> RouterConfig:
    return parse_config_checked(text, file)[0]


def load_config_checked(path: str | Path) -> tuple[RouterConfig, list[ConfigIssue]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), None, "(file)",
                                       f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue(str(path), line, "(file)",
                                       f"not UTF-8 text (byte {raw[exc.start]:#04x})")]) from None
    return parse_config_checked(text, str(path))


def load_config(path: str | Path) -> RouterConfig:
    """The config, logging its warnings (the service's loads and reloads)."""
    config, warnings = load_config_checked(path)
    for warning in warnings:
        log.warning("config warning: %s", warning)
    return config
