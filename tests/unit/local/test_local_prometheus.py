"""`tunemesh up --prometheus`: the scrape configuration, and a real Prometheus started,
scraping a stand-in service, and stopped by `tunemesh down`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunemesh_local import launcher, processes, prometheus
from tunemesh_local.launcher import MeshConfig, ServiceSpec
from tunemesh_local.state import ProcessRecord

RECORDS = [
    ProcessRecord("etcd", "etcd", 1, None, "etcd.log", address="127.0.0.1:2379"),
    ProcessRecord("checkpoint", "checkpoint", 2, None, "c.log", metrics_url="http://127.0.0.1:9001/metrics"),
    ProcessRecord("trainer-0", "trainer", 3, None, "t0.log", metrics_url="http://127.0.0.1:9002/metrics"),
    ProcessRecord("trainer-1", "trainer", 4, None, "t1.log", metrics_url="http://10.0.0.7:9003/custom"),
    ProcessRecord("sampler-0", "sampler", 5, None, "s.log"),  # metrics turned off
]


def _jobs(text: str) -> dict:
    import yaml  # the test reads the file the way any YAML reader would

    return {job["job_name"]: [(c["targets"], c["labels"]) for c in job["static_configs"]]
            for job in yaml.safe_load(text)["scrape_configs"]}


def test_scrape_config_has_one_job_per_role_and_a_node_label_per_target():
    text = prometheus.scrape_config(RECORDS, interval_s=1)
    assert "scrape_interval: 1s" in text
    assert _jobs(text) == {
        "checkpoint": [(["127.0.0.1:9001"], {"node": "checkpoint", "__metrics_path__": "/metrics"})],
        "trainer": [(["127.0.0.1:9002"], {"node": "trainer-0", "__metrics_path__": "/metrics"}),
                    (["10.0.0.7:9003"], {"node": "trainer-1", "__metrics_path__": "/custom"})],
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
@pytest.mark.parametrize("records", [RECORDS, RECORDS[:1]])
def test_promtool_accepts_the_scrape_config(tmp_path: Path, records):
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus.scrape_config(records))
    out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_the_config_with_the_alert_rules(tmp_path: Path):
    assert prometheus.ALERT_RULES.is_file()  # the source checkout ships them
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus.scrape_config(RECORDS, rule_files=[prometheus.ALERT_RULES]))
    import yaml

    assert yaml.safe_load(path.read_text())["rule_files"] == [str(prometheus.ALERT_RULES)]
    out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "rules found" in out.stdout + out.stderr, out.stdout + out.stderr


STAND_IN = """
import json, os, signal, sys, time
from prometheus_client import Counter, start_http_server
Counter("tunemesh_standin_ticks", "ticks").inc(3)
server, _ = start_http_server(0, "127.0.0.1")
ready = sys.argv[1]
with open(ready + ".tmp", "w") as f:
    json.dump({"address": "127.0.0.1:1", "pid": os.getpid(),
               "metrics_url": f"http://127.0.0.1:{server.server_port}/metrics"}, f)
os.replace(ready + ".tmp", ready)
signal.sigwait([signal.SIGTERM])
"""


def _stand_in(config: MeshConfig, etcd_endpoint: str, api_keys_file: Path) -> list[ServiceSpec]:
    return [ServiceSpec("scheduler", "scheduler", (sys.executable, "-c", STAND_IN, str(config.ready_file("scheduler"))))]


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("etcd") is None,
                    reason="prometheus or etcd not installed (Debian: prometheus, etcd-server)")
def test_up_with_prometheus_scrapes_the_services_and_down_stops_it(tmp_path: Path):
    mesh = launcher.up(MeshConfig(state_dir=tmp_path, prometheus=True, ready_timeout=30), _stand_in)
    record = mesh.by_role("prometheus")[0]
    try:
        assert prometheus.is_ready(mesh.prometheus_url)
        assert "tunemesh_standin" not in (tmp_path / "prometheus.yml").read_text()
        deadline, result = time.monotonic() + 15, []
        while not result and time.monotonic() < deadline:
            result = prometheus.query(mesh.prometheus_url, 'tunemesh_standin_ticks_total{job="scheduler"}')
            time.sleep(0.2)
        assert result and result[0]["metric"]["node"] == "scheduler" and float(result[0]["value"][1]) == 3
    finally:
        launcher.down(tmp_path, grace=5)
    assert not processes.is_alive(record.pid, record.start_time)
    assert (tmp_path / "prometheus").is_dir()  # its data outlives the mesh, like checkpoints
