"""deploy/prometheus/alerts.yml passes `promtool check rules` and its unit tests (`promtool test rules`)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

from deploy.dashboards.promql import SERVER_ERROR_CODES

PROMETHEUS = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "prometheus"
ALERTS = {"TunemeshQueueStuck", "TunemeshNodeLeaseLost", "TunemeshEtcdUnreachable", "TunemeshProcessDown",
          "TunemeshRpcErrorRate", "TunemeshSamplerStalled", "TunemeshSamplerSlow"}
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_pass_promtool_check():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@needs_promtool
def test_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_unit_tested_firing():
    """Each alert of alerts.yml has a test case in alerts_test.yml where it fires."""
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert {rule["alert"] for rule in rules()} == ALERTS == firing


def test_error_rate_alert_counts_the_dashboards_server_error_codes():
    (rule,) = [rule for rule in rules() if rule["alert"] == "TunemeshRpcErrorRate"]
    assert f'grpc_code=~"{SERVER_ERROR_CODES}"' in rule["expr"]


def test_every_alert_has_a_severity_and_summary():
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
