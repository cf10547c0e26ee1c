"""deploy/dashboards: the committed deploy/grafana/*.json match the code, are valid Grafana
models, and query only documented metrics with well-formed PromQL."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from deploy.dashboards import __main__ as generator
from deploy.dashboards.layout import concrete, label_variables, panel_targets

REPO = pathlib.Path(__file__).resolve().parents[3]
METRIC = re.compile(r"\b(?:tunemesh|process)_\w+|\bup(?=\{)")
BUILTINS = {"__rate_interval", "__range"}
SAMPLE_VALUES = {"__rate_interval": "1m", "__range": "1h", "tenant": "acme", "node": "trainer-0", "datasource": "x"}


@pytest.fixture(scope="module")
def boards() -> dict[str, dict]:
    return {name: json.loads(text) for name, text in generator.render().items()}


def queries(boards: dict[str, dict]) -> list[tuple[str, str, str]]:
    return [(name, title, expr) for name, board in boards.items() for title, expr in panel_targets(board)]


def test_committed_dashboards_match_the_generator():
    assert generator.main(["--check"]) == 0


def test_check_names_stale_missing_and_extra_files(tmp_path, capsys):
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "trainer.json").write_text((tmp_path / "trainer.json").read_text().replace("p95", "p96"))
    (tmp_path / "sampler.json").unlink()
    (tmp_path / "old.json").write_text("{}")
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1
    assert "trainer.json, sampler.json, old.json" in capsys.readouterr().err


def test_five_dashboards_with_unique_uids(boards):
    assert sorted(boards) == ["checkpoint.json", "fleet-overview.json", "sampler.json", "tenant-usage.json",
                              "trainer.json"]
    assert len({board["uid"] for board in boards.values()}) == 5


@pytest.mark.parametrize("name", sorted(generator.render()))
def test_dashboard_is_a_grafana_model_on_a_prometheus_variable(boards, name):
    board = boards[name]
    assert board["schemaVersion"] >= 39 and board["title"].startswith("tunemesh / ")
    (datasource,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)) and "" not in ref_ids, panel["title"]


def test_queries_use_only_defined_variables(boards):
    for name, title, expr in queries(boards):
        defined = {v["name"] for v in boards[name]["templating"]["list"]} | BUILTINS
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, (name, title, used - defined)


def documented_metrics() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    names = set()
    for name, kind in re.findall(r"^\| `(tunemesh_\w+)` \| (\w+) \|", text, flags=re.M):
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_queries_use_only_documented_metrics(boards):
    documented = documented_metrics() | {"up", "process_resident_memory_bytes", "process_cpu_seconds_total"}
    used = {metric for _, _, expr in queries(boards) for metric in METRIC.findall(expr)}
    assert used and used <= documented, used - documented
    assert "tunemesh_sampler_adapter_load_duration_seconds_bucket" in used  # the pattern sees histograms


def test_variables_list_documented_metrics(boards):
    for board in boards.values():
        for metric, _label in label_variables(board).values():
            assert metric in documented_metrics()


def test_counters_and_histograms_are_read_over_a_range(boards):
    """A counter or histogram series is only ever used as `name{...}[window]` (inside rate/increase)."""
    for name, title, expr in queries(boards):
        for match in re.finditer(r"\b(tunemesh_\w+_(?:total|bucket|sum|count)|process_cpu_seconds_total)\{[^}]*\}(.)",
                                 expr):
            assert match[2] == "[", (name, title, match[1])


def test_quantiles_sum_buckets_by_le(boards):
    found = 0
    for name, title, expr in queries(boards):
        for grouping in re.findall(r"histogram_quantile\([\d.]+, sum by \(([^)]*)\) \(rate\(\w+_bucket", expr):
            found += 1
            assert "le" in [label.strip() for label in grouping.split(",")], (name, title)
        assert expr.count("histogram_quantile") == expr.count("_bucket{"), (name, title)
    assert found > 10


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_queries_parse_as_promql(boards, tmp_path):
    """Every query, variables filled in, is valid PromQL: promtool checks it as a recording rule."""
    exprs = sorted({concrete(expr, SAMPLE_VALUES) for _, _, expr in queries(boards)})
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": f"panel:query_{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_concrete_fills_plain_and_braced_variables():
    expr = 'rate(x{tenant=~"$tenant", node=~"${node}"}[$__rate_interval]) + $unknown'
    assert concrete(expr, SAMPLE_VALUES) == 'rate(x{tenant=~"acme", node=~"trainer-0"}[1m]) + $unknown'


def test_label_variables_name_metric_and_label(boards):
    assert label_variables(boards["tenant-usage.json"]) == {"tenant": ("tunemesh_scheduler_queue_depth", "tenant")}
    assert label_variables(boards["fleet-overview.json"]) == {}
