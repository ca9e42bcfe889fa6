"""Fuzzing where outside data enters: forces.yaml (the config loader), centre telemetry (the
MQTT parser) and incident handoffs (the HTTP validator). Each has one rule: it accepts, or it
refuses with the error it promises (ConfigError naming file, line and key; TelemetryError
with a reason; a contract-shaped 400), and never raises anything else.

Hypothesis generates inputs (derandomized and bounded, so a run is reproducible and quick);
tests/corpus/{config,telemetry,incident}/ keeps nasty inputs as files, each replayed on every
run. When hypothesis finds a new one, add it to the corpus.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import ConfigError, RouterConfig, load_config_checked, parse_config
from router.handoff.incident import Incident
from router.http.errors import HttpError, parse_body, validate
from router.watch.telemetry import Telemetry, TelemetryError, as_dict, parse_telemetry

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
BUNDLED = (ROOT / "config" / "forces.yaml").read_text()
BUNDLED_DATA = yaml.safe_load(BUNDLED)

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def corpus(kind: str) -> list[Path]:
    return sorted(p for p in (CORPUS / kind).iterdir() if p.is_file())


# ---- nasty values, shared by all three ------------------------------------------------------

NASTY_CHARS = ["\x00", "\ufeff", "\u2028", "\u2029", "\x85", "\r", "\t", "\x1b", "\u202e",
               "\ud800", "\udfff", "\uffff", "\U0010ffff", "\\", '"', "'", ":", "#", "&", "*",
               "!", "|", ">", "%", "@", "`", "{", "}", "[", "]", ",", "-", "?"]
TEXT = st.text(st.characters(codec=None) | st.characters(categories=["Cs"])
               | st.sampled_from(NASTY_CHARS), max_size=40)
NUMBERS = st.one_of(
    st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.0, 1e308, 5e-324]))
JSON_SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)
# what replaces a field of an almost valid input: often a near miss of the right type
FIELD_VALUES: st.SearchStrategy[Any] = st.sampled_from([
    math.inf, -math.inf, math.nan, -0.0, 0, -1, 1.5, 10**400, 1e308, 2**63, "", " ", "1",
    "true", "no", "\x00", "\ud800", "9999-12-31T23:59:59-23:59", True, False, None, [], {},
    "x" * 5000]) | JSON_VALUES


# ---- the config loader ----------------------------------------------------------------------

def yaml_lines(text: str) -> int:
    """Lines as YAML counts them (it breaks lines at CR, LF, NEL, LS and PS too); an error at
    the end of the stream is on the line after the last break."""
    return len(re.findall("\r\n|[\n\r\x85\u2028\u2029]", text)) + 1


def check_config(text: str, file: str = "fuzz.yaml") -> RouterConfig | ConfigError:
    try:
        return parse_config(text, file)
    except ConfigError as exc:
        assert exc.issues, "a ConfigError with no issue in it"
        last = yaml_lines(text)
        for issue in exc.issues:
            assert issue.file == file, issue
            assert isinstance(issue.line, int) and 1 <= issue.line <= last, issue
            assert issue.key and issue.message, issue
        return exc


YAML_SCALARS = st.sampled_from([
    "~", "null", "''", '""', "yes", "no", "on", "off", ".nan", ".inf", "-.inf", "-0.0",
    "0x1F", "0o17", "1_000", "2:30", "1e999", "9" * 5000, "2025-03-25", "2025-03-25T22:28:00Z",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGk=",
    "!!set {a}", "!custom x", "*nowhere", "&anchor", "&a [*a]", "[", "]", "{", "}", "'", '"',
    "|", ">", "- x", "? x", "{a: 1, a: 2}", "[" * 100 + "]" * 100, "x" * 10_000,
    "\"\\ud800\"", "\"\\0\"", "'\ufeff'", "\t", "\u2028", "@x", "`x`", "%YAML 1.1"]) | st.builds(
    json.dumps, JSON_SCALARS.filter(lambda v: not isinstance(v, str)))


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """The bundled file with a few lines deleted, repeated, moved, re-indented, cut short or
    given a nasty value: mostly almost valid, so validation goes deep."""
    lines = BUNDLED.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "value", "delete", "repeat", "move", "indent",
                                   "insert", "cut"]))
        if op == "value" and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {draw(YAML_SCALARS)}\n"
        elif op == "delete":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "move":
            lines.insert(draw(st.integers(0, len(lines) - 1)), lines.pop(i))
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t", "    "])) + lines[i].lstrip()
        elif op == "insert":
            lines.insert(i, draw(TEXT) + "\n")
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        if not lines:
            break
    return "".join(lines)


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*at, i))
    return out


BUNDLED_PATHS = _paths(BUNDLED_DATA)[1:]


@st.composite
def mutated_data(draw: st.DrawFn) -> str:
    """The bundled config as data, a few values replaced or removed, written back as YAML:
    always well-formed YAML, so pydantic and the cross-checks see it."""
    data = json.loads(json.dumps(BUNDLED_DATA))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(BUNDLED_PATHS))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the way there
            continue
    return yaml.dump(data, allow_unicode=True, sort_keys=False)


YAMLISH = st.lists(st.sampled_from(["a", "b", "1", " ", "  ", "\n", ":", "- ", "[", "]", "{",
                                    "}", ",", "&x ", "*x", "!!", "'", '"', "#", "\t", "\ufeff",
                                    "---\n", "? ", "|\n", "\x00", "\u2028", "%"]),
                   max_size=60).map("".join)


@FUZZ
@given(mutated_text())
def test_config_loader_on_a_mutated_bundled_file(text: str) -> None:
    check_config(text)


@FUZZ
@given(mutated_data())
def test_config_loader_on_mutated_bundled_data(text: str) -> None:
    check_config(text)


@settings(FUZZ, max_examples=500)
@given(YAMLISH | st.builds(lambda v: yaml.dump(v, allow_unicode=True), JSON_VALUES))
def test_config_loader_on_random_yaml(text: str) -> None:
    check_config(text)


@pytest.mark.parametrize("path", corpus("config"), ids=lambda p: p.name)
def test_config_corpus(path: Path) -> None:
    """Each file as the service reads one (bytes, decoded here), and each decodable one as
    text too."""
    try:
        load_config_checked(path)
    except ConfigError as exc:
        for issue in exc.issues:
            assert issue.file == str(path), issue
            assert isinstance(issue.line, int) and issue.line >= 1, issue
            assert issue.key and issue.message, issue
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return
    check_config(text, path.name)


def test_the_loader_refuses_objects_and_alias_bombs() -> None:
    """Safe loading is not enough on its own: a tag naming Python code is refused, and so is a
    few hundred bytes of aliases that expand to a billion values."""
    for name in ("python-object-apply.yaml", "python-object-nested.yaml", "python-name.yaml",
                 "billion-laughs.yaml", "billion-laughs-in-bundled.yaml"):
        result = check_config((CORPUS / "config" / name).read_text(), name)
        assert isinstance(result, ConfigError), f"{name} was accepted"


# ---- the telemetry parser -------------------------------------------------------------------

def check_telemetry(payload: bytes) -> Telemetry | TelemetryError:
    try:
        return parse_telemetry(payload)
    except TelemetryError as exc:
        assert str(exc).strip(), "refused without a reason"
        return exc


def accepted_telemetry_is_sound(reading: Telemetry) -> None:
    """What the parser lets through is shown on /v1/forces and the dashboard as JSON, and
    compared with thresholds: finite, non-negative, with an aware time."""
    assert reading.ts.tzinfo is not None
    assert math.isfinite(reading.oldest_wait_s) and reading.oldest_wait_s >= 0
    assert min(reading.calls_waiting, reading.handlers_available,
               reading.handlers_on_duty) >= 0
    json.dumps(as_dict(reading), allow_nan=False)


TELEMETRY = {"ts": 1742941680, "telephony_up": True, "cad_up": True, "calls_waiting": 3,
             "handlers_available": 10, "handlers_on_duty": 40, "oldest_wait_s": 4.5}


@st.composite
def near_telemetry(draw: st.DrawFn) -> bytes:
    payload: dict[str, Any] = dict(TELEMETRY)
    for key in draw(st.lists(st.sampled_from([*TELEMETRY, "extra"]), max_size=3)):
        if draw(st.booleans()):
            payload[key] = draw(FIELD_VALUES)
        else:
            payload.pop(key, None)
    text = json.dumps(payload, allow_nan=True)  # NaN and Infinity, as a careless sender writes
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(st.binary(max_size=300) | st.builds(
    lambda v: json.dumps(v).encode("utf-8", "surrogatepass"), JSON_VALUES))
def test_telemetry_parser_on_random_payloads(payload: bytes) -> None:
    check_telemetry(payload)


@settings(FUZZ, max_examples=300)
@given(near_telemetry())
def test_telemetry_parser_on_almost_valid_payloads(payload: bytes) -> None:
    check_telemetry(payload)


@settings(FUZZ, max_examples=300)
@given(near_telemetry())
def test_telemetry_parser_lets_through_only_sound_readings(payload: bytes) -> None:
    result = check_telemetry(payload)
    if isinstance(result, Telemetry):
        accepted_telemetry_is_sound(result)


@pytest.mark.parametrize("path", corpus("telemetry"), ids=lambda p: p.name)
def test_telemetry_corpus(path: Path) -> None:
    result = check_telemetry(path.read_bytes())
    if isinstance(result, Telemetry):
        accepted_telemetry_is_sound(result)


# ---- the incident validator -----------------------------------------------------------------

def check_incident(run: Callable[[], Incident]) -> Incident | HttpError:
    """`run` validates an incident: it returns one, or refuses with the contract's 400."""
    try:
        incident = run()
    except HttpError as exc:
        assert exc.status_code == 400, exc.text
        body = json.loads(exc.text or "")
        assert isinstance(body["error"], str) and body["error"], body
        assert isinstance(body["message"], str) and body["message"], body
        assert isinstance(body.get("field", ""), str), body
        return exc
    again = json.loads(json.dumps(incident.contract_json(), allow_nan=False))
    assert validate(Incident, again) == incident, "what it stores does not read back the same"
    return incident


INCIDENT = {"incident_id": "KNT-2025-0001", "from": "kent", "to": "met", "priority": "P1",
            "service": "999", "opened_at": "2025-03-25T22:28:00Z",
            "location": {"lat": 51.5, "lon": -0.12}, "category": "assault",
            "summary": "caller reports an assault in progress",
            "caller": {"name": "A Caller", "phone": "+44 20 7946 0000"}}
INCIDENT_KEYS = [*INCIDENT, "call_id", "location.lat", "location.lon", "location.address",
                 "caller.name", "caller.phone", "extra"]


@st.composite
def near_incident(draw: st.DrawFn) -> dict[str, Any]:
    incident: dict[str, Any] = json.loads(json.dumps(INCIDENT))
    for key in draw(st.lists(st.sampled_from(INCIDENT_KEYS), max_size=3)):
        *parents, name = key.split(".")
        target = incident
        for parent in parents:
            target = target.setdefault(parent, {}) if isinstance(target, dict) else {}
        if not isinstance(target, dict):
            continue
        if draw(st.booleans()):
            target[name] = draw(FIELD_VALUES)
        else:
            target.pop(name, None)
    return incident


@FUZZ
@given(JSON_VALUES)
def test_incident_validator_on_random_json(data: Any) -> None:
    check_incident(lambda: validate(Incident, data))


@settings(FUZZ, max_examples=300)
@given(near_incident())
def test_incident_validator_on_almost_valid_incidents(data: dict[str, Any]) -> None:
    check_incident(lambda: validate(Incident, data))


@pytest.mark.parametrize("path", corpus("incident"), ids=lambda p: p.name)
def test_incident_corpus(path: Path) -> None:
    """As the HTTP service reads a body: bytes, parsed strictly, then validated."""
    raw = path.read_bytes()
    check_incident(lambda: parse_body(raw, Incident))
