"""No dead panels: after real training and sampling (the shared `observed_mesh`), every query
of every dashboard in deploy/grafana returns data from the mesh's Prometheus."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deploy.dashboards.layout import concrete, label_variables, panel_targets

pytestmark = pytest.mark.e2e

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
METRIC = re.compile(r"\b(?:tunemesh|process)_\w+|\bup(?=\{)")


def api(url: str, path: str, **params) -> object:
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def boards() -> dict[str, dict]:
    found = {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}
    assert len(found) == 5, sorted(found)
    return found


def variable_values(url: str, board: dict, window: str) -> dict[str, str]:
    """Grafana's variables as concrete values: for label variables, the first value Prometheus lists."""
    values = {"__rate_interval": window, "__range": window}
    for name, (metric, label) in label_variables(board).items():
        listed = api(url, f"label/{label}/values", **{"match[]": metric})
        assert listed, f"variable ${name} lists no {label} of {metric}"
        values[name] = listed[0]
    return values


def test_every_dashboard_metric_is_scraped(observed_mesh):
    scraped = set(api(observed_mesh.prometheus_url, "label/__name__/values"))
    used = {m for board in boards().values() for _, expr in panel_targets(board) for m in METRIC.findall(expr)}
    assert used and not used - scraped, sorted(used - scraped)


def test_every_panel_query_returns_data(observed_mesh):
    """Each query returns at least one series with a finite number (the traffic ran in two
    rounds with scrapes between, so rates, ratios and quantiles see increases)."""
    url, now = observed_mesh.prometheus_url, time.time()
    started = api(url, "query", query="min(process_start_time_seconds)")["result"][0]["value"][1]
    window = f"{int(now - float(started)) + 5}s"  # every sample since the mesh started
    dead = []
    for name, board in boards().items():
        values = variable_values(url, board, window)
        for title, expr in panel_targets(board):
            query = concrete(expr, values)
            result = api(url, "query", query=query, time=now)["result"]
            numbers = [float(series["value"][1]) for series in result]
            if not any(math.isfinite(n) for n in numbers):
                dead.append(f"{name} / {title}: {query} -> {result}")
    assert not dead, "\n".join(dead)
