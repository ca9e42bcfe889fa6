"""Printable escalation sheets: when a handoff misses its deadline the control room acts on
paper, as staff did in the Met's March 2025 outage. One HTML page (print-ready, one incident)
and one CSV row file per escalated handoff, written atomically into `handoff.spool_dir`.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.infra.files import write_atomically
from router.infra.timefmt import iso

CSV_FIELDS = ("handoff_id", "incident_id", "from", "to", "priority", "service", "call_id",
              "opened_at", "accepted_at", "escalated_at", "status", "category", "summary",
              "lat", "lon", "address", "caller_name", "caller_phone", "last_reason")


@dataclass(frozen=True, slots=True)
class Sheet:
    """What to print: the incident as accepted and where its delivery stands."""

    handoff_id: str
    incident: Mapping[str, Any]
    accepted_at: float
    escalated_at: float
    status: str
    last_reason: str = ""

    def row(self) -> dict[str, str]:
        inc = self.incident
        loc = inc.get("location") or {}
        caller = inc.get("caller") or {}
        values: dict[str, Any] = {
            "handoff_id": self.handoff_id, "incident_id": inc.get("incident_id"),
            "from": inc.get("from"), "to": inc.get("to"), "priority": inc.get("priority"),
            "service": inc.get("service"), "call_id": inc.get("call_id"),
            "opened_at": inc.get("opened_at"), "accepted_at": iso(self.accepted_at, "seconds"),
            "escalated_at": iso(self.escalated_at, "seconds"), "status": self.status,
            "category": inc.get("category"), "summary": inc.get("summary"),
            "lat": loc.get("lat"), "lon": loc.get("lon"), "address": loc.get("address"),
            "caller_name": caller.get("name"), "caller_phone": caller.get("phone"),
            "last_reason": self.last_reason,
        }
        return {k: "" if values[k] is None else str(values[k]) for k in CSV_FIELDS}


_FORMULA = ("=", "+", "-", "@")


def render_csv(sheets: Sequence[Sheet]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for sheet in sheets:
        # a leading =, +, - or @ would run as a formula in a spreadsheet: quote it harmless
        writer.writerow({k: ("'" + v if v.startswith(_FORMULA) and k not in ("lat", "lon")
                              else v) for k, v in sheet.row().items()})
    return out.getvalue()


_LABELS = (("priority", "Priority"), ("incident_id", "Incident"), ("from", "Logged by"),
           ("to", "For"), ("service", "Service"), ("call_id", "Call"), ("opened_at", "Opened"),
           ("accepted_at", "Accepted"), ("escalated_at", "Escalated"), ("status", "Delivery"),
           ("last_reason", "Last delivery error"), ("category", "Category"),
           ("address", "Address"), ("lat", "Latitude"), ("lon", "Longitude"),
           ("caller_name", "Caller"), ("caller_phone", "Caller phone"))


def render_html(sheet: Sheet) -> str:
    row = sheet.row()
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(label)}</th><td>{e(row[key])}</td></tr>"
                     for key, label in _LABELS if row[key])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ESCALATED {e(row['priority'])} handoff {e(row['incident_id'])} for {e(row['to'])}</title>
<style>
 body {{ font: 12pt/1.4 system-ui, sans-serif; margin: 2em; }}
 h1 {{ font-size: 18pt; border-bottom: 3px solid #000; }}
 table {{ border-collapse: collapse; width: 100%; }}
 th, td {{ border: 1px solid #000; padding: .4em; text-align: left; vertical-align: top; }}
 th {{ width: 25%; background: #eee; }}
 .summary {{ border: 2px solid #000; padding: 1em; margin: 1em 0; white-space: pre-wrap; }}
 .actions td {{ height: 2.5em; }}
 @media print {{ body {{ margin: 0; }} }}
</style></head><body>
<h1>ESCALATED INCIDENT HANDOFF &mdash; {e(row['priority'])} for {e(row['to'].upper())}</h1>
<p>This incident was accepted by overflow-router but its delivery to the destination CAD
missed the {e(row['priority'])} deadline. Handle it by hand and record the actions below.
Handoff <code>{e(sheet.handoff_id)}</code>.</p>
<table>
{rows}
</table>
<div class="summary"><strong>Summary:</strong> {e(row['summary'])}</div>
<table class="actions">
<tr><th>Taken by (name, collar no.)</th><td></td></tr>
<tr><th>Time taken</th><td></td></tr>
<tr><th>Local incident number</th><td></td></tr>
<tr><th>Actions</th><td></td></tr>
</table>
</body></html>
"""


def sheet_paths(spool_dir: Path, incident: Mapping[str, Any], hid: str) -> tuple[Path, Path]:
    """`escalated/{to}/{priority}-{handoff_id}.html` and `.csv` under the spool folder."""
    folder = spool_dir / "escalated" / str(incident.get("to", "unknown"))
    stem = f"{incident.get('priority', 'P4')}-{hid}"
    return folder / f"{stem}.html", folder / f"{stem}.csv"


def write_sheet(spool_dir: Path, sheet: Sheet) -> tuple[Path, Path]:
    """Write the sheet's HTML and CSV (`sheet_paths`); blocking (call it in a thread).
    Rewriting the same handoff replaces its files."""
    html_path, csv_path = sheet_paths(spool_dir, sheet.incident, sheet.handoff_id)
    write_atomically(html_path, render_html(sheet))
    write_atomically(csv_path, render_csv([sheet]))
    return html_path, csv_path
