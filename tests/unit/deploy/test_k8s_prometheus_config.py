"""deploy/k8s: the Prometheus configuration the chart ships passes `promtool check config`
together with the alert rules it ships, and labels targets the way dashboards expect."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml
from chart_variants import render_variant

REPO = pathlib.Path(__file__).resolve().parents[3]


def _config_maps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in render_variant("default") if d["kind"] == "ConfigMap"}


def test_rules_config_map_holds_the_alert_rules_verbatim():
    rules = _config_maps()["tm-prometheus-rules"]["data"]["tunemesh-alerts.yml"]
    assert yaml.safe_load(rules) == yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())


def test_targets_get_job_instance_and_node_labels():
    config = yaml.safe_load(_config_maps()["tm-prometheus"]["data"]["prometheus.yml"])
    [job] = config["scrape_configs"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"job", "instance", "node", "__address__"} <= targets


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_the_config_with_its_rules(tmp_path):
    maps = _config_maps()
    config = yaml.safe_load(maps["tm-prometheus"]["data"]["prometheus.yml"])
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "tunemesh-alerts.yml").write_text(maps["tm-prometheus-rules"]["data"]["tunemesh-alerts.yml"])
    config["rule_files"] = [str(tmp_path / "rules" / "*.yml")]  # where the chart's comment says to mount them
    for job in config["scrape_configs"]:  # Debian's Prometheus is built without Kubernetes discovery
        assert job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 rules found" in done.stdout + done.stderr
