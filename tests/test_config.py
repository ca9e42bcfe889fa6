"""Config validation: every broken file in tests/configs/broken/ is refused with exactly the
errors written in its `# expect:` header, and the bundled config is valid and complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import ConfigError, load_config, parse_config
from router.config.load import parse_config_checked
from router.engine.model import Service

HERE = Path(__file__).parent / "configs"
BROKEN = sorted((HERE / "broken").glob("*.yaml"))
ROOT = HERE.parent.parent
CONTRACT_FORCES = {"met", "city", "kent", "surrey", "sussex", "essex", "herts", "tvp"}
ISSUE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<key>\S+): (?P<message>.+)$")


def expected(path: Path) -> list[str]:
    return [line.removeprefix("# expect: ") for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


def test_there_are_broken_files_with_expectations() -> None:
    assert len(BROKEN) >= 15
    for path in BROKEN:
        assert expected(path), f"{path.name} has no '# expect:' header"


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_config_is_refused_with_exact_errors(path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(path.parent)  # so errors name the file as a manager would type it
    with pytest.raises(ConfigError) as err:
        load_config(path.name)
    assert str(err.value).splitlines() == expected(path)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_every_error_names_file_line_and_key_and_reads_plainly(path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = path.read_text().splitlines()
    for issue in err.value.issues:
        match = ISSUE.match(str(issue))
        assert match, str(issue)
        assert match["file"] == str(path)
        assert issue.line is not None and 1 <= issue.line <= len(text)
        if issue.key not in ("(yaml)", "(top)"):
            # the line named holds the key (for a missing key, its parent)
            keys = re.sub(r"\[\d+\]", "", issue.key).split(".")
            named = keys[-2] if issue.message == "required key is missing" else keys[-1]
            assert named in text[issue.line - 1], str(issue)
        # written for a control-room manager, not a Python developer
        assert "Input should" not in issue.message and "pydantic" not in issue.message
        assert "Value error" not in issue.message


def test_the_two_force_base_of_the_broken_files_is_valid() -> None:
    cfg = load_config(HERE / "two-forces.yaml")
    assert set(cfg.forces) == {"met", "kent"}


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    # no line to name: the file itself is the problem
    assert str(err.value) == (f"{tmp_path / 'nope.yaml'}: (file): "
                              "cannot read: No such file or directory")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nname: Caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:2: (file): not UTF-8 text (byte 0xe9)"


def test_no_999_partners_or_no_evidence_is_a_warning_not_an_error() -> None:
    """Valid (tests and declaration-only set-ups use them) but said, never silently taken."""
    text = (HERE / "two-forces.yaml").read_text().replace(
        '      "999":\n        - {to: met, weight: 2}\n', '      "999": []\n').replace(
        "      max_queue: 150\n", "      max_queue: 150\n      telemetry: false\n")
    cfg, warnings = parse_config_checked(text, "two.yaml")
    assert set(cfg.forces) == {"met", "kent"}
    assert [str(w) for w in warnings] == [
        "two.yaml:11: forces.met.centre.telemetry: off, and there are no probes: only a "
        "manager's declaration can ever tell the router met's state",
        "two.yaml:40: forces.kent.overflow.999: no partners: if kent's centre fails, its 999 "
        "calls can only go home as last resort"]


def test_validate_prints_warnings_and_still_passes(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main

    path = tmp_path / "quiet.yaml"
    path.write_text((HERE / "two-forces.yaml").read_text().replace(
        "      max_queue: 150\n", "      max_queue: 150\n      telemetry: false\n"))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{path}: valid — 2 forces, 1 warning"
    assert f"warning: {path}:11: forces.met.centre.telemetry: off" in out


def test_empty_file_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("# nothing here\n", "empty.yaml")
    assert str(err.value) == "empty.yaml:1: (top): the file must be a YAML mapping"


def test_bundled_config_is_valid_with_the_contract_forces() -> None:
    cfg = load_config(ROOT / "config" / "forces.yaml")
    assert set(cfg.forces) == CONTRACT_FORCES
    for fid, force in cfg.forces.items():
        for service in Service:
            routes = force.overflow[service]
            assert routes, f"{fid} has no {service.value} overflow route"
            assert sum(r.weight for r in routes) > 0
            assert all(r.to in CONTRACT_FORCES and r.to != fid for r in routes)
            assert force.sip[service].startswith("sip")
        assert force.mutual_aid.reserve_999 <= force.mutual_aid.max_concurrent
