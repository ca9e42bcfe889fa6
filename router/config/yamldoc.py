"""YAML documents validated with line numbers: every problem as `FILE:LINE: key: message`.

Used for the config and for simulation scenarios alike, so a manager fixes either in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from router.config.schema import PATTERN_MESSAGES

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None  # None when there is no line to name (the file could not be read)
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found; str() gives one `FILE:LINE: key: message` per line."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


MAX_DEPTH = 64  # far beyond any real config; keeps hostile nesting from exhausting the stack
MAX_NODES = 100_000  # values after alias expansion; the bundled config has about 1,000
_YAML_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = frozenset(_YAML_TAG + t for t in ("null", "bool", "int", "float", "str", "seq",
                                                "map", "timestamp"))


class _Refused(Exception):
    """The document cannot be turned into plain data; says where and why."""

    def __init__(self, line: int, path: Path_, message: str):
        self.line, self.path, self.message = line, path, message


def _key_text(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


class YamlTree:
    """A YAML document turned into plain data, remembering the line of every key."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.issues: list[ConfigIssue] = []
        self._scalars = yaml.SafeLoader("")
        self._budget = MAX_NODES
        self.data: Any = None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 if mark else 1
            problem = getattr(exc, "problem", None) or str(exc)
            context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and start and start.line + 1 != line:  # say where the broken part began
                problem += f" ({context} that starts on line {start.line + 1})"
            self.issues.append(ConfigIssue(file, line, "(yaml)", f"not valid YAML: {problem}"))
            return
        except RecursionError:
            self.issues.append(ConfigIssue(file, 1, "(yaml)", "nested too deeply to read"))
            return
        if node is None:
            return
        try:
            self.data = self._convert(node, (), ())
        except _Refused as exc:  # the document cannot be read as plain data at all
            path = exc.path  # named by its key, not by a position deep inside expanded aliases
            while path and isinstance(path[-1], int):
                path = path[:-1]
            line = self.lines.get(path, exc.line) if path != exc.path else exc.line
            self.issues.append(ConfigIssue(file, line, _key_text(path), exc.message))
            self.data = None

    def _convert(self, node: yaml.Node, path: Path_, within: tuple[int, ...]) -> Any:
        """Plain data from a node. Aliases are followed, but a document that refers to itself,
        nests beyond MAX_DEPTH or expands beyond MAX_NODES (a "billion laughs") is refused, as
        is any tag beyond YAML's plain types: the config is data, never objects."""
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if id(node) in within:
            raise _Refused(line, path, "an alias refers to a node that contains it")
        if len(within) >= MAX_DEPTH:
            raise _Refused(line, path, f"nested more than {MAX_DEPTH} levels deep")
        self._budget -= 1
        if self._budget < 0:
            raise _Refused(line, path, f"more than {MAX_NODES} values once aliases are "
                           "expanded")
        if node.tag not in _PLAIN_TAGS:
            raise _Refused(line, path, f"tag {node.tag.replace(_YAML_TAG, '!!')} is not allowed "
                           "(only plain text, numbers, true/false, lists and mappings)")
        inner = (*within, id(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) \
                    else None
                if not isinstance(key, (str, int, float, bool)):
                    raise _Refused(key_node.start_mark.line + 1, path, "a key must be plain text")
                key = str(key) if isinstance(key, (int, float, bool)) else key
                sub = (*path, key)
                if key in out:
                    self.issues.append(
                        ConfigIssue(self.file, key_node.start_mark.line + 1, _key_text(sub),
                                    f"duplicate key, already set on line {self.lines[sub]} "
                                    "(YAML would silently keep only the last)")
                    )
                self.lines[sub] = key_node.start_mark.line + 1
                out[key] = self._convert(value_node, sub, inner)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, (*path, i), inner) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.Node, path: Path_) -> Any:
        try:
            return self._scalars.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a 5,000-digit number
            why = str(exc).splitlines()[0].split(";")[0][:120]
            raise _Refused(node.start_mark.line + 1, path,
                           f"cannot read this value: {why}") from None

    def line_of(self, path: Path_) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.line_of(path), _key_text(path), message)


def _pydantic_issues(tree: YamlTree, exc: ValidationError) -> Iterable[ConfigIssue]:
    for err in exc.errors():
        # pydantic puts union/annotated branch names and dict-key markers into loc; drop them
        path: Path_ = tuple(p for p in err["loc"] if p not in ("[key]",) and not _is_branch(p))
        kind = err["type"]
        msg = _plain_message(kind, err.get("ctx", {})) or err["msg"]
        if kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
            field_, sep, rest = msg.partition(": ")
            if sep and " " not in field_:
                path, msg = (*path, *field_.split(".")), rest
        if kind not in ("missing", "extra_forbidden") and "input" in err and not isinstance(
            err["input"], (dict, list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        yield tree.issue(path, msg)


# pydantic's wording ("Input should be ...") addressed to the people who edit this file
_PLAIN = {
    "extra_forbidden": "unknown key (misspelt, or not allowed here)",
    "missing": "required key is missing",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "greater_than_equal": "must be {ge:g} or more",
    "greater_than": "must be more than {gt:g}",
    "less_than_equal": "must be {le:g} or less",
    "less_than": "must be less than {lt:g}",
    "literal_error": "must be {expected}",
    "enum": "must be {expected}",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
}


def _plain_message(kind: str, ctx: dict[str, Any]) -> str | None:
    if kind == "string_pattern_mismatch":
        return PATTERN_MESSAGES.get(ctx.get("pattern", ""))
    template = _PLAIN.get(kind)
    return template.format(**ctx) if template else None


def _is_branch(part: str | int) -> bool:
    return isinstance(part, str) and (part.startswith(("function-", "constrained-")) or part in (
        "int", "float", "str", "bool", "none", "list[str]", "tuple[str, ...]"
    ))


M = TypeVar("M", bound=BaseModel)


Check = Callable[[YamlTree, M], Iterable[ConfigIssue]]


def parse_document(text: str, file: str, model: type[M], cross_check: Check[M]) -> M:
    """Validate any YAML document (the config, a simulation scenario) the same way: every
    problem at once, each as `FILE:LINE: key: message`."""
    return parse_document_checked(text, file, model, cross_check, lambda tree, doc: ())[0]


def parse_document_checked(text: str, file: str, model: type[M], cross_check: Check[M],
                           warn: Check[M]) -> tuple[M, list[ConfigIssue]]:
    """As parse_document, also returning what `warn` finds in a valid document."""
    tree = YamlTree(file, text)
    if tree.issues and tree.data is None:
        raise ConfigError(tree.issues)
    if not isinstance(tree.data, dict):
        raise ConfigError([*tree.issues, tree.issue((), "the file must be a YAML mapping")])
    try:
        doc = model.model_validate(tree.data)
    except ValidationError as exc:
        issues = [*tree.issues, *_pydantic_issues(tree, exc)]
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0)) from None
    issues = [*tree.issues, *cross_check(tree, doc)]
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0))
    return doc, sorted(warn(tree, doc), key=lambda i: i.line or 0)
