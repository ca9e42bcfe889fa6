"""The tree shows the architecture: parts in folders, small modules, imports flowing one way,
and the README's Layout table naming what is really there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ROOT / "router"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250
# Which part may import which: data flows HTTP → call desk → pure engine, never back up.
# A part not listed for another must not import it.
MAY_IMPORT = {
    "engine": {"config", "engine", "infra"},
    "config": {"config", "engine.model"},
    "infra": {"config", "infra"},
    "watch": {"config", "engine", "infra", "watch"},
    "handoff": {"config", "engine.model", "infra", "handoff"},
    "runtime": {"config", "engine", "watch", "handoff", "infra", "runtime"},
    "http": {"config", "engine", "watch", "handoff", "infra", "runtime", "http"},
    "tools": {"config", "engine", "watch", "handoff", "infra", "runtime", "http", "tools"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROUTER.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every router module `name` imports, at any depth of the file (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_inside_router() -> None:
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def part(module: str) -> str:
    rest = module.removeprefix("router.").split(".")
    return rest[0]


def allowed(source: str, target: str) -> bool:
    rest = target.removeprefix("router.")
    return any(rest == p or rest.startswith(p + ".") for p in MAY_IMPORT[part(source)])


def test_parts_import_only_downwards() -> None:
    mods = modules()
    wrong = []
    for name, path in mods.items():
        if name in ("router", "router.cli", "router.__main__") or part(name) not in MAY_IMPORT:
            continue
        wrong += [f"{name} imports {t}" for t in sorted(imports(name, path, set(mods)))
                  if t != "router" and not allowed(name, t)]
    assert not wrong, "\n".join(wrong)


def test_modules_and_classes_stay_small() -> None:
    too_big = []
    for name, path in modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{name}.{node.name}: {size} lines")
    assert not too_big, too_big


def test_the_readme_layout_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set()
    for cell in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        for path in re.findall(r"`([^`]+)`", cell):
            named.add(path.rstrip("/"))
            assert (ROOT / path).exists(), f"the Layout table names {path}, which is not there"
    # every part of router/ is named: its folder, or each module in it
    for item in sorted(ROUTER.iterdir()):
        if item.name.startswith(("_", ".")) or item.suffix not in ("", ".py") or (
                item.is_dir() and not any(item.rglob("*.py"))):
            continue
        rel = str(item.relative_to(ROOT))
        assert rel in named or any(n.startswith(rel + "/") for n in named), \
            f"{rel} is missing from the README's Layout table"
