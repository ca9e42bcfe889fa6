"""Load and validate `forces.yaml`.

Validation happens once, here, where the file enters: every error is reported as
`FILE:LINE: key.path: message`, all of them at once, so a manager fixes a config in one pass.
The rest of the router only ever sees a `RouterConfig` that passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from router.config.schema import RouterConfig
from router.config.yamldoc import ConfigError, ConfigIssue, Path_, YamlTree, parse_document


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
            if routes and sum(r.weight for r in routes) == 0:
                yield tree.issue(base, "weights sum to zero: no partner could ever be chosen")
    from adapters.base import option_problems  # each adapter owns its options' model

    for fid, force in cfg.forces.items():
        for where, message in option_problems(force.cad.adapter, force.cad.options):
            yield tree.issue(("forces", fid, "cad", *where), message)
    for i, token in enumerate(cfg.service.tokens):
        role = token.role
        if role.startswith("partner:") and role.removeprefix("partner:") not in cfg.forces:
            yield tree.issue(("service", "tokens", i, "role"),
                             f"{role!r} names an unknown force (known: {known})")


def parse_config(text: str, file: str = "<config>") -> RouterConfig:
    return parse_document(text, file, RouterConfig, _semantic_issues)


def load_config(path: str | Path) -> RouterConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "(file)", exc.strerror or str(exc))]) from None
    return parse_config(text, str(path))
