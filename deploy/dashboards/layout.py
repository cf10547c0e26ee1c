"""tunemesh's Grafana building blocks over grafana-foundation-sdk: panels, variables, dashboards.

Every panel queries the dashboard's `datasource` variable (any Prometheus data source), so
the JSON imports as is, with no `__inputs` to fill in. Multi-value variables select all
values by default and stand for the regex `.*` then, so queries match them with `=~`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_sdk
from grafana_foundation_sdk.builders import dashboard as sdk
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
ALL = model.VariableOption(selected=True, text="All", value="$__all")
LABEL_VALUES = re.compile(r"label_values\((?P<metric>.+),\s*(?P<label>\w+)\)")


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel; `legend` is Grafana's legend format (`{{label}}`)."""

    expr: str
    legend: str = ""


def _targets(queries: list[Query], instant: bool) -> list[prometheus.Dataquery]:
    targets = []
    for index, query in enumerate(queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index)).datasource(DATASOURCE)
        if query.legend:
            target = target.legend_format(query.legend)
        targets.append(target.instant() if instant else target.range())
    return targets


def timeseries_panel(title: str, description: str, queries: list[Query], unit: str = "short",
                     width: int = 12, height: int = 8) -> timeseries.Panel:
    """A time series panel of `queries`, lines with a light fill."""
    panel = (timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).min(0).fill_opacity(10)
             .line_width(1).span(width).height(height)
             .legend(common_sdk.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
    return _described(panel, description).targets(_targets(queries, instant=False))


def stat_panel(title: str, description: str, queries: list[Query], unit: str = "short",
               width: int = 4, height: int = 4, red_at: float | None = None) -> stat.Panel:
    """A single-figure panel of instant `queries`; `red_at` turns it red from that value up."""
    steps = [model.Threshold(value=None, color="green")]
    if red_at is not None:
        steps.append(model.Threshold(value=red_at, color="red"))
    panel = (stat.Panel().title(title).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).graph_mode(common.BigValueGraphMode.NONE)
             .color_mode(common.BigValueColorMode.VALUE)
             .thresholds(sdk.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
             .reduce_options(common_sdk.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return _described(panel, description).targets(_targets(queries, instant=True))


def _described(panel, description: str):
    return panel.description(description) if description else panel


def datasource_variable() -> sdk.DatasourceVariable:
    """`$datasource`: the Prometheus every panel queries."""
    return sdk.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, metric: str) -> sdk.QueryVariable:
    """`$name`: the values of label `name` on `metric`, several at once, all by default."""
    return (sdk.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(f"label_values({metric}, {name})").refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True).all_value(".*")
            .current(ALL))


def dashboard(uid: str, title: str, description: str, variables: list[sdk.QueryVariable],
              rows: list[tuple[str, list]]) -> dict:
    """The dashboard `uid` as Grafana's JSON model: rows of panels laid out left to right."""
    board = (sdk.Dashboard(title).uid(uid).description(description).tags(["tunemesh"]).editable()
             .time("now-1h", "now").refresh("30s").timezone("browser").tooltip(model.DashboardCursorSync.CROSSHAIR)
             .annotation(_builtin_annotations()).with_variable(datasource_variable()))
    for variable in variables:
        board = board.with_variable(variable)
    panel_id = 0
    for row_title, panels in rows:
        panel_id += 1
        board = board.with_row(sdk.Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def _builtin_annotations() -> sdk.AnnotationQuery:
    grafana = model.DataSourceRef(type_val="grafana", uid="-- Grafana --")
    return (sdk.AnnotationQuery().name("Annotations & Alerts").datasource(grafana).enable(True).hide(True)
            .icon_color("rgba(0, 211, 255, 1)").type("dashboard").built_in(1))


def panel_targets(board: dict) -> list[tuple[str, str]]:
    """`(panel title, expr)` of every target of every panel of a dashboard's JSON."""
    found = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            found.extend((inner["title"], target["expr"]) for target in inner.get("targets", []))
    return found


def label_variables(board: dict) -> dict[str, tuple[str, str]]:
    """`{variable: (metric, label)}` of a dashboard's `label_values` query variables."""
    found = {}
    for variable in board.get("templating", {}).get("list", []):
        match = LABEL_VALUES.fullmatch(str(variable.get("query", ""))) if variable["type"] == "query" else None
        if match:
            found[variable["name"]] = (match["metric"], match["label"])
    return found


def concrete(expr: str, values: dict[str, str]) -> str:
    """`expr` with Grafana's variables (`$name`, `${name}`) replaced by `values[name]`."""
    def replace(match: re.Match) -> str:
        name = match["braced"] or match["bare"]
        return values[name] if name in values else match[0]
    return re.sub(r"\$\{(?P<braced>\w+)\}|\$(?P<bare>\w+)", replace, expr)
