"""The audit log is a hash chain: every record names the one before, so an edited, removed,
reordered or inserted line is found and named, while a line cut short by a crash is not taken
for tampering. Reloads (applied and refused, and who asked) and handoff escalations are in it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from handoff_support import incident
from service_support import MANAGER, make_config, running_service

from adapters import sim
from router.http.app import _reload_on_hup
from router.infra.audit import GENESIS, AuditLog, read_audit, verify

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, count: int, start: int = 0) -> None:
    audit = AuditLog(path)
    for i in range(start, start + count):
        audit.record("state_change", force="met", before="normal", after="down",
                     source="probe", reason=f"probe {i} failed — ünïcode")
    audit.close()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_the_chain_holds_across_many_records_and_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 300)
    write(path, 50, start=300)  # a new AuditLog on the same file: a restart
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == list(range(1, 351))
    prev = GENESIS
    for r in records:  # the rule, checked without the module: sha256 of canonical JSON
        body = {k: v for k, v in r.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert r["prev"] == prev
        assert r["hash"] == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        prev = r["hash"]
    assert records[-1]["reason"] == "probe 349 failed — ünïcode"
    verdict = verify(path)
    assert verdict.intact and verdict.records == 350 and verdict.last_hash == prev
    assert verdict.summary() == f"{path}: 350 records, chain intact (last hash {prev})"
    # the reader existing callers use still sees every record, with its usual fields
    assert [r["from"] for r in read_audit(path)] == ["normal"] * 350


def test_records_are_on_disk_when_sync_returns_and_close_is_clean(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a" / "b" / "audit.jsonl")  # folders are made
    audit.record("declaration", force="kent", before="normal", after="draining",
                 source="manager:T", reason="shift change", expires_in_s=None)
    assert audit.sync()
    assert json.loads(lines(audit.path)[0])["reason"] == "shift change"
    audit.close()
    audit.close()  # twice is harmless
    assert audit.sync()


def edited(text: list[str]) -> list[str]:
    record = json.loads(text[3])
    record["reason"] = "nothing to see here"
    return [*text[:3], json.dumps(record) + "\n", *text[4:]]


def forged(text: list[str]) -> list[str]:
    record = json.loads(text[4])  # a plausible record put in before line 5
    return [*text[:4], json.dumps({**record, "force": "kent"}) + "\n", *text[4:]]


@pytest.mark.parametrize(("tamper", "line", "seq", "says"), [
    (edited, 4, 4, "hash mismatch: the record was edited"),
    (lambda t: t[:3] + t[4:], 4, 5, "prev does not match the hash of record seq 3 (line 3): "
                                    "seq 4 missing: records removed"),
    (lambda t: t[:3] + t[5:], 4, 6, "seq 4 to 5 missing: records removed"),
    (lambda t: t[1:], 1, 2, "prev does not match the genesis value: seq 1 missing"),
    (lambda t: [*t[:3], t[4], t[3], *t[5:]], 4, 5, "seq 4 comes later in the file: "
                                                   "records reordered"),
    (lambda t: [*t[:4], t[1], *t[4:]], 5, 2, "seq 2 again after seq 4: a record inserted"),
    (forged, 5, 5, "hash mismatch"),
    (lambda t: [*t[:4], "rm -rf /\n", *t[4:]], 5, 5, "not JSON"),
    (lambda t: [*t[:4], '{"kind": "clear", "force": "met"}\n', *t[4:]], 5, 5,
     "no seq, prev or hash: a line inserted"),
    (lambda t: [*t, "not a record\n", '{"seq": 11'], 11, 11, "not JSON"),  # more than a tear
])
def test_verify_names_the_first_broken_line(tmp_path: Path,
                                            tamper: Callable[[list[str]], list[str]],
                                            line: int, seq: int, says: str) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 10)
    path.write_text("".join(tamper(lines(path))), encoding="utf-8")
    verdict = verify(path)
    assert not verdict.intact and verdict.broken is not None
    assert (verdict.broken.line, verdict.broken.seq) == (line, seq)
    assert verdict.summary().startswith(f"{path}:{line}: record seq {seq}: ")
    assert says in verdict.summary()


def test_a_torn_last_line_is_a_crash_not_tampering_and_the_chain_resumes(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 5)
    whole = lines(path)[-1]
    with path.open("a", encoding="utf-8") as f:
        f.write(whole[: len(whole) // 2])  # a crash in the middle of the append
    verdict = verify(path)
    assert verdict.intact and verdict.records == 5 and verdict.torn_tail == 6
    assert "torn tail at line 6" in verdict.summary()

    write(path, 2, start=5)  # the restart: the torn line ended, noted, then new records
    records = list(read_audit(path))
    assert [(r["seq"], r["kind"]) for r in records[-3:]] == [
        (6, "torn_tail"), (7, "state_change"), (8, "state_change")]
    assert records[-3]["prev"] == json.loads(whole)["hash"]  # resumed from the last good one
    verdict = verify(path)
    assert verdict.intact and verdict.records == 8 and verdict.torn == [6]
    assert verdict.torn_tail is None

    text = lines(path)  # but a "torn" line changed afterwards is not a crash any more
    text[5] = text[5].replace("seq", "sEq")
    path.write_text("".join(text), encoding="utf-8")
    verdict = verify(path)
    assert verdict.broken is not None and verdict.broken.line == 6
    assert verdict.summary().endswith("record seq 6: not JSON")


def test_a_record_that_lost_only_its_newline_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 3)
    path.write_text(path.read_text().removesuffix("\n"))
    write(path, 1, start=3)
    assert [r["seq"] for r in read_audit(path)] == [1, 2, 3, 4]
    assert verify(path).records == 4


def test_a_log_from_before_the_chain_is_continued_with_a_new_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = {"time": "2025-03-25T22:28:00.000Z", "kind": "declaration", "force": "met",
           "from": "normal", "to": "down", "source": "manager:T", "reason": "CAD crash"}
    path.write_text(json.dumps(old) + "\n" + json.dumps(old) + "\n")
    write(path, 2)
    verdict = verify(path)
    assert verdict.intact and (verdict.unchained, verdict.records) == (2, 2)
    assert [r.get("seq") for r in read_audit(path)] == [None, None, 1, 2]


def test_a_moved_log_has_its_own_chain_and_continues_one_it_finds(tmp_path: Path) -> None:
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    write(second, 2)
    audit = AuditLog(first)
    audit.record("clear", force="met", before="down", after="automatic", source="m", reason="a")
    audit.move(second)
    audit.record("clear", force="kent", before="down", after="automatic", source="m",
                 reason="b")
    audit.close()
    assert [(r["seq"], r["force"]) for r in read_audit(first)] == [(1, "met")]
    assert [(r["seq"], r["force"]) for r in read_audit(second)] == [
        (1, "met"), (2, "met"), (3, "kent")]
    assert verify(first).intact and verify(second).records == 3


# ---- what goes into the chain, from the running service --------------------------------------


async def test_reloads_applied_and_refused_are_audited_with_who_asked(tmp_path: Path) -> None:
    path = make_config(tmp_path)
    good = path.read_text()
    async with running_service(path) as api:
        status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert status == 200, body
        path.write_text(good.replace("handlers_on_duty: 120", "handlers_on_duty: -1"))
        status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert status == 422 and body["error"] == "config_invalid"
        await _reload_on_hup(api.service.runtime)()  # what SIGHUP runs; refused too
        path.write_text(good)
        await _reload_on_hup(api.service.runtime)()
    reloads = [r for r in read_audit(tmp_path / "audit.jsonl") if r["kind"] == "reload"]
    assert [(r["outcome"], r["source"]) for r in reloads] == [
        ("applied", f"{MANAGER} (manager:TEST_TOKEN_2)"),
        ("refused", f"{MANAGER} (manager:TEST_TOKEN_2)"),
        ("refused", "SIGHUP"), ("applied", "SIGHUP")]
    assert all(r["config"] == str(path) and r["force"] is None for r in reloads)
    assert reloads[0]["forces"] == list(api.service.config.forces)
    assert reloads[0]["restart_required"] == []
    issues = reloads[1]["issues"]
    assert issues == reloads[2]["issues"]
    assert any("forces.met.centre.handlers_on_duty" in issue for issue in issues), issues
    assert verify(tmp_path / "audit.jsonl").intact


async def test_a_reload_that_moves_the_log_says_so_in_the_old_one(tmp_path: Path) -> None:
    path = make_config(tmp_path)
    async with running_service(path) as api:
        raw = yaml.safe_load(path.read_text())
        raw["service"]["audit_log"] = str(tmp_path / "moved" / "audit.jsonl")
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        status, body = await api.call("POST", "/v1/admin/reload", "manager")
        assert status == 200, body
        status, _ = await api.call("PUT", "/v1/forces/met/override", "manager",
                                   json={"state": "down", "reason": "after the move"})
        assert status == 200
    old = list(read_audit(tmp_path / "audit.jsonl"))
    new = list(read_audit(tmp_path / "moved" / "audit.jsonl"))
    assert old[-1]["kind"] == "reload"
    assert old[-1]["audit_log"] == str(tmp_path / "moved" / "audit.jsonl")
    assert new[0]["seq"] == 1 and new[0]["reason"] == "after the move"
    assert verify(tmp_path / "audit.jsonl").intact
    assert verify(tmp_path / "moved" / "audit.jsonl").intact


@pytest.fixture
def sim_cads() -> Any:
    sim.reset()
    yield
    sim.reset()


def escalations(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["kind"] == "escalation"] if path.exists() else []


async def test_a_handoff_escalation_is_audited(tmp_path: Path, sim_cads: None) -> None:
    path = make_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["handoff"]["deadlines_s"] = {"P1": 0.2, "P2": 300, "P3": 1800, "P4": 7200}
    raw["forces"]["tvp"]["cad"] = {"adapter": "sim", "options": {"up": False}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with running_service(path) as api:
        status, handoff = await api.call("POST", "/v1/handoffs", "partner:kent",
                                         json=incident(1, to="tvp"))
        assert status == 202, handoff
        for _ in range(200):  # the status is stored first; the sheet and the alert follow
            assert await asyncio.to_thread(api.service.audit.sync)
            if escalations(tmp_path / "audit.jsonl"):
                break
            await asyncio.sleep(0.05)
        _, now = await api.call("GET", f"/v1/handoffs/{handoff['id']}", "viewer")
        assert now["status"] == "escalated", now
    found = escalations(tmp_path / "audit.jsonl")
    assert len(found) == 1, found
    record = found[0]
    assert (record["force"], record["source"]) == ("tvp", "handoff desk")
    assert record["alert"]["handoff_id"] == handoff["id"]
    assert record["alert"]["kind"] == "handoff_escalated"
    assert "P1 handoff" in record["reason"]
    assert verify(tmp_path / "audit.jsonl").intact


# ---- the command line ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "audit", "verify", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 4)
    last = json.loads(lines(path)[-1])["hash"]
    done = cli(str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: 4 records, chain intact (last hash {last})"

    path.write_text("".join(lines(path)[:1] + lines(path)[2:]))
    done = cli(str(path))
    assert done.returncode == 1
    assert done.stdout.startswith(f"{path}:2: record seq 3: prev does not match")

    done = cli(str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "cannot read" in done.stderr
    assert cli(str(tmp_path)).returncode == 2  # a folder
