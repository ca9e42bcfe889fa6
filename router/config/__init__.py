"""`forces.yaml`: its shape (schema), its validation with line numbers (yamldoc), its loading.

The names other parts use are re-exported here, so they read `from router.config import ...`.
"""

from router.config.health import Health, OutlierDetection
from router.config.load import load_config, load_config_checked, parse_config
from router.config.schema import (
    FORCE_ID,
    Cad,
    Centre,
    Handoff,
    Mqtt,
    MutualAid,
    OverloadLevels,
    Priority,
    Probe,
    RouterConfig,
    Strict,
    Token,
)
from router.config.yamldoc import ConfigError, ConfigIssue, YamlTree, parse_document

__all__ = [
    "FORCE_ID", "Cad", "Centre", "ConfigError", "ConfigIssue", "Handoff", "Health", "Mqtt",
    "MutualAid", "OutlierDetection", "OverloadLevels", "Priority", "Probe", "RouterConfig",
    "Strict", "Token",
    "YamlTree", "load_config", "load_config_checked", "parse_config", "parse_document",
]
