"""Generate deploy/grafana/overflow-router.json: the control-room board, from Prometheus alone.

    python deploy/grafana/dashboard.py            # rewrite the JSON
    python deploy/grafana/dashboard.py --check    # exit 1 if the JSON is not what this makes

Built with grafana-foundation-sdk (Grafana's own typed builders, in the dev extras), so panel
and query shapes are checked by its types rather than hand-written JSON. Every query names
only metrics and labels the router exports: tests/test_grafana.py scrapes a running router
and checks each one. Gauges the routers all report alike (a centre's state, its capacity) are
taken with `max by`, so two routers in a region show one value; counters are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    dashboard,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    ValueMap,
    ValueMappingResult,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "overflow-router.json"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")

CAD_UP = 'max by (force) (overflow_centre_component_up{component="cad"})'
# The board's columns, one instant query each, joined on `force`
BOARD_COLUMNS = [
    ("state", 'max by (force, state) (overflow_centre_state == 1)'),
    ("diverting", "max by (force) (overflow_centre_diverting)"),
    ("share diverted", "max by (force) (overflow_centre_share_diverted)"),
    ("phones up", 'max by (force) (overflow_centre_component_up{component="telephony"})'),
    ("CAD up", CAD_UP),
    ("calls in flight", "sum by (force) (overflow_calls_in_flight)"),
    ("calls waiting", "max by (force) (overflow_centre_calls_waiting)"),
    ("oldest wait", "max by (force) (overflow_centre_oldest_wait_seconds)"),
    ("handlers", 'max by (force) (overflow_centre_capacity{limit="handlers_on_duty"})'),
    ("aid in flight", "max by (force) (overflow_aid_in_flight)"),  # each router gives the sum
    ("aid headroom 999", 'min by (force) (overflow_aid_headroom{service="999"})'),
    ("declared", "max by (force) (overflow_override_active)"),
    ("declared for", "max by (force) (overflow_override_age_seconds)"),
]


def query(expr: str, legend: str = "", *, instant: bool = False,
          ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(PromQueryFormat.TABLE)
    return q


def yes_no(no: str, yes: str) -> ValueMap:
    return ValueMap({"0": ValueMappingResult(text=no, color="green"),
                     "1": ValueMappingResult(text=yes, color="red")})


def board_table() -> table.Panel:
    """The control-room board itself: a row per force, as the router's own page shows it."""
    panel = (table.Panel().title("Centres now").datasource(DS).height(10).span(24)
             .description("One row per force; the same facts as the router's board at /."))
    for i, (_, expr) in enumerate(BOARD_COLUMNS):
        panel = panel.with_target(query(expr, instant=True, ref=chr(ord("A") + i)))
    renames = {f"Value #{chr(ord('A') + i)}": name for i, (name, _) in enumerate(BOARD_COLUMNS)}
    return (panel
            .with_transformation(DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True}, "renameByName": renames}))
            .show_header(True)
            .override_by_name("diverting", [DynamicConfigValue(
                id_val="mappings", value=[yes_no("keeping its calls", "diverting")])])
            .override_by_name("declared", [DynamicConfigValue(
                id_val="mappings", value=[yes_no("no", "yes")])])
            .override_by_name("share diverted", [DynamicConfigValue(
                id_val="unit", value="percentunit")])
            .override_by_name("oldest wait", [DynamicConfigValue(id_val="unit", value="s")])
            .override_by_name("declared for", [DynamicConfigValue(id_val="unit", value="s")]))


def timeline(title: str, expr: str, legend: str, mapping: ValueMap) -> statetimeline.Panel:
    return (statetimeline.Panel().title(title).datasource(DS).height(7).span(12)
            .with_target(query(expr, legend)).mappings([mapping]))


def series(title: str, unit: str, *queries: tuple[str, str], span: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).datasource(DS).height(8).span(span).unit(unit)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, ref=chr(ord("A") + i)))
    return panel


def single(title: str, expr: str, unit: str = "none") -> stat.Panel:
    return (stat.Panel().title(title).datasource(DS).height(4).span(6).unit(unit)
            .with_target(query(expr)))


def build() -> dict[str, Any]:
    board = (
        dashboard.Dashboard("overflow-router: control room")
        .uid("overflow-router")
        .tags(["overflow-router", "999"])
        .refresh("10s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource")
                       .label("Prometheus").type("prometheus"))
        .with_row(dashboard.Row("The board"))
        .with_panel(board_table())
        .with_panel(timeline("Diverting", "max by (force) (overflow_centre_diverting)",
                             "{{force}}", yes_no("keeping", "diverting")))
        .with_panel(timeline("CAD", CAD_UP, "{{force}}", ValueMap({
                                 "0": ValueMappingResult(text="CAD down", color="red"),
                                 "1": ValueMappingResult(text="CAD up", color="green")})))
        .with_row(dashboard.Row("Where calls go"))
        .with_panel(series("Where 999 calls go now (share)", "percentunit",
                           ('max by (origin, destination) '
                            '(overflow_routing_share{service="999"})',
                            "{{origin}} → {{destination}}")))
        .with_panel(series("Calls routed per second, by reason", "reqps",
                           ("sum by (reason) (rate(overflow_calls_routed_total[1m]))",
                            "{{reason}}")))
        .with_panel(series("999 calls to the last resort, per origin", "short",
                           ('sum by (origin) (increase(overflow_calls_routed_total'
                            '{service="999",reason="last_resort"}[5m]))', "{{origin}}")))
        .with_panel(series("Calls in flight", "short",
                           ("sum by (force) (overflow_calls_in_flight)", "{{force}}")))
        .with_row(dashboard.Row("Queues and mutual aid"))
        .with_panel(series("Calls waiting", "short",
                           ("max by (force) (overflow_centre_calls_waiting)", "{{force}}")))
        .with_panel(series("Oldest wait", "s",
                           ("max by (force) (overflow_centre_oldest_wait_seconds)",
                            "{{force}}")))
        .with_panel(series("Mutual aid in use (share of the 999 cap)", "percentunit",
                           ('max by (force) (overflow_aid_in_flight) / on (force) '
                            '(max by (force) (overflow_aid_cap{service="999"}) > 0)',
                            "{{force}}")))
        .with_panel(series("Mutual-aid headroom", "short",
                           ("min by (force, service) (overflow_aid_headroom)",
                            "{{force}} {{service}}")))
        .with_row(dashboard.Row("Handoffs"))
        .with_panel(series("Handoffs not yet delivered", "short",
                           ("sum by (destination, priority) (overflow_handoff_backlog)",
                            "{{destination}} {{priority}}")))
        .with_panel(series("Handoff outcomes per minute", "short",
                           ("sum by (status) (increase(overflow_handoff_outcomes_total[1m]))",
                            "{{status}}")))
        .with_row(dashboard.Row("The router"))
        .with_panel(single("Routers answering scrapes", 'sum(up{job="overflow-router"})'))
        .with_panel(single("Evidence lost (fail static)",
                           "max(overflow_evidence_fail_static)"))
        .with_panel(single("Last reload applied", "min(overflow_config_last_reload_successful)"))
        .with_panel(single("Configs running (distinct hashes)",
                           "count(count by (config_hash) (overflow_config_info))"))
        .with_panel(series("/v1/route and the decision, p99", "s",
                           ("histogram_quantile(0.99, sum by (le) "
                            "(rate(overflow_route_request_seconds_bucket[5m])))", "request"),
                           ("histogram_quantile(0.99, sum by (le) "
                            "(rate(overflow_decision_seconds_bucket[5m])))", "decision")))
        .with_panel(series("Server errors per second", "reqps",
                           ('sum by (route) (rate(overflow_http_requests_total'
                            '{status=~"5.."}[1m]))', "{{route}}")))
        .with_panel(series("Failure detection time, p90", "s",
                           ("histogram_quantile(0.9, sum by (force, le) "
                            "(rate(overflow_failover_detection_seconds_bucket[1h])))",
                            "{{force}}")))
        .with_panel(series("Probe failures per second", "short",
                           ("sum by (force, kind) (rate(overflow_probe_failures_total[1m]))",
                            "{{force}} {{kind}}")))
    )
    out: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return out


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
