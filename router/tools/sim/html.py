"""`simulate --html FILE`: one self-contained page a manager can open without a network —
the comparison in tables, and the night in inline SVG charts (calls waiting, 999 answer time,
calls carried for others against each cap), strategies side by side on the same scales, with
the real failures shaded."""

from __future__ import annotations

import html
from typing import Any

from router.engine.model import Service
from router.tools.sim.report import TARGET, Report, percentile
from router.tools.sim.scenario import clock_at
from router.tools.sim.truth import down

W, H, PAD_L, PAD_B, PAD_T = 420, 200, 44, 22, 8
BIN_S = 300  # answer time per 5 minutes
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")
Series = tuple[str, str, list[float], list[float], bool]  # label, colour, xs, ys, dashed


def render(report: Report) -> str:
    data = report.to_json()
    sc = report.scenario
    colour = {fid: COLOURS[i % len(COLOURS)] for i, fid in enumerate(report.config.forces)}
    bands = _bands(report)
    names = list(report.outcomes)
    rows = [("Calls waiting (999 and 101) at each centre", _waiting, "calls"),
            ("999 answer time: 90th percentile of calls answered, per 5 min", _answer, "s"),
            ("Calls carried for other forces (dashed: the mutual-aid cap)", _aid, "calls")]
    charts = []
    for title, series_of, unit in rows:
        series = {n: series_of(report, n, colour) for n in names}
        top = max([max(s[3], default=0) for ss in series.values() for s in ss] + [1])
        cells = "".join(f"<td><b>{html.escape(n)}</b><br>"
                        f"{_chart(series[n], sc.duration_s, top, bands, report)}</td>"
                        for n in names)
        charts.append(f"<h3>{html.escape(title)} ({unit})</h3><table><tr>{cells}</tr></table>")
    legend = " ".join(f'<span style="color:{c}">&#9632; {html.escape(f)}</span>'
                      for f, c in colour.items())
    return _PAGE.format(
        title=html.escape(sc.name), description=html.escape(sc.description),
        meta=html.escape(f"seed {report.seed}, from {sc.start}, "
                         f"{sc.duration_s / 3600:.2f} h"),
        warnings="".join(f"<p class=warn>warning: {html.escape(w)}</p>"
                         for w in data["warnings"]),
        summary=_summary(data), forces=_forces(data), legend=legend, charts="".join(charts))


def _summary(data: dict[str, Any]) -> str:
    head = ("<tr><th>strategy</th><th>service</th><th>offered</th><th>answered</th>"
            "<th>abandoned</th><th>shed</th><th>within 10 s</th><th>p50 s</th><th>p90 s</th>"
            "<th>p99 s</th><th>worst 15 min</th></tr>")
    rows = []
    for name, result in data["strategies"].items():
        for s in Service:
            r = result["region"][s.value]
            share = r["within_10s_share"]
            mark = "" if s is not Service.EMERGENCY or share is None else (
                " class=ok" if share >= TARGET else " class=bad")
            worst = r["worst_15min"]
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{s.value}</td><td>{r['offered']}</td>"
                f"<td>{r['answered']}</td><td>{r['abandoned']}</td><td>{r['shed']}</td>"
                f"<td{mark}>{_pct(share)}</td>"
                + "".join(f"<td>{_num(r['answer_s'][q])}</td>" for q in ("p50", "p90", "p99"))
                + f"<td>{_worst(worst)}</td></tr>")
    return f"<table class=grid>{head}{''.join(rows)}</table>"


def _worst(worst: dict[str, Any] | None) -> str:
    if worst is None:
        return "-"
    return f"{html.escape(worst['from'])} {_pct(worst['within_10s_share'])}"


def _forces(data: dict[str, Any]) -> str:
    names = list(data["strategies"])
    head = "<tr><th>force</th>" + "".join(
        f"<th>{html.escape(n)}: 999 within 10 s</th><th>aid peak / cap, over cap</th>"
        for n in names) + "</tr>"
    rows = []
    forces = next(iter(data["strategies"].values()))["forces"] if names else {}
    for fid in forces:
        cells = ""
        for n in names:
            f = data["strategies"][n]["forces"][fid]
            aid = f["aid"]
            cells += (f"<td>{_pct(f['999']['within_10s_share'])}</td><td>{aid['peak']} / "
                      f"{aid['cap']}, {aid['over_cap_s'] / 60:.0f} min</td>")
        rows.append(f"<tr><td>{html.escape(fid)}</td>{cells}</tr>")
    return f"<table class=grid>{head}{''.join(rows)}</table>"


def _waiting(report: Report, name: str, colour: dict[str, str]) -> list[Series]:
    out = report.outcomes[name].samples
    return [(fid, colour[fid], s.t, [a + b for a, b in zip(s.waiting_999, s.waiting_101,
                                                            strict=True)], False)
            for fid, s in out.items()]


def _answer(report: Report, name: str, colour: dict[str, str]) -> list[Series]:
    tallies = report.outcomes[name].tallies
    bins = int(report.scenario.duration_s // BIN_S) + 1
    out: list[Series] = []
    for fid in report.config.forces:
        t = tallies[(fid, Service.EMERGENCY)]
        per: list[list[float]] = [[] for _ in range(bins)]
        for at, wait in zip(t.answered_at, t.waits, strict=True):
            per[int(at // BIN_S)].append(wait)
        xs = [i * BIN_S + BIN_S / 2 for i in range(bins) if per[i]]
        ys = [percentile(sorted(p), 0.9) or 0.0 for p in per if p]
        out.append((fid, colour[fid], xs, ys, False))
    return out


def _aid(report: Report, name: str, colour: dict[str, str]) -> list[Series]:
    outcome = report.outcomes[name]
    out: list[Series] = []
    for fid, s in outcome.samples.items():
        if max(s.aid, default=0) == 0:
            continue
        cap = float(outcome.centres[fid].aid_cap)
        out.append((fid, colour[fid], s.t, [float(a) for a in s.aid], False))
        out.append((f"{fid} cap", colour[fid], [0.0, report.scenario.duration_s], [cap, cap],
                    True))
    return out


def _bands(report: Report) -> list[tuple[float, float, str, str]]:
    """The real failures: (from, to, colour, label)."""
    sc = report.scenario
    out = []
    for fid in report.config.forces:
        out += [(a, b, "#fce5cd", f"{fid} CAD down") for a, b in down(sc, fid, "cad_up")]
        out += [(a, b, "#f4cccc", f"{fid} phones down") for a, b in down(sc, fid, "phones_up")]
    return out


def _chart(series: list[Series], duration: float, top: float,
           bands: list[tuple[float, float, str, str]], report: Report) -> str:
    pw, ph = W - PAD_L - 6, H - PAD_B - PAD_T

    def x(t: float) -> float:
        return PAD_L + pw * t / duration

    def y(v: float) -> float:
        return PAD_T + ph * (1 - v / top)

    parts = [f'<svg width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-size="10" font-family="sans-serif">']
    parts += [f'<rect x="{x(a):.1f}" y="{PAD_T}" width="{max(x(b) - x(a), 1):.1f}" '
              f'height="{ph}" fill="{c}"><title>{html.escape(label)}</title></rect>'
              for a, b, c, label in bands]
    for i in range(5):
        v = top * i / 4
        parts.append(f'<line x1="{PAD_L}" x2="{W - 6}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     f'stroke="#ddd"/><text x="{PAD_L - 4}" y="{y(v) + 3:.1f}" '
                     f'text-anchor="end">{v:.0f}</text>')
    step = 3600.0 if duration > 3 * 3600 else 1800.0
    t = 0.0
    while t <= duration:
        parts.append(f'<text x="{x(t):.1f}" y="{H - 6}" text-anchor="middle">'
                     f'{clock_at(report.scenario, t)}</text>')
        t += step
    for label, colour, xs, ys, dashed in series:
        if not xs:
            continue
        points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, ys, strict=True))
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.4"{dash} '
                     f'points="{points}"><title>{html.escape(label)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table.grid {{ border-collapse: collapse; margin: .5em 0 1em; }}
table.grid td, table.grid th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td.ok {{ background: #d9ead3; }} td.bad {{ background: #f4cccc; }}
.warn {{ color: #a61c00; }} td {{ vertical-align: top; }}
</style></head><body>
<h1>{title}</h1><p>{description}<br>{meta}</p>{warnings}
<h2>Region</h2>{summary}
<h2>Forces</h2>{forces}
<h2>Over the night</h2>
<p>Shaded: phones down (red), CAD down (orange) — the truth, not what the router believed.
Target: 90% of 999 calls answered within 10 s.</p><p>{legend}</p>
{charts}
</body></html>
"""
