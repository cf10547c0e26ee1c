"""A Prometheus scraping the local mesh: its configuration, start and readiness.

Debian's `prometheus` binary runs as one more recorded process of the mesh, with its
configuration in `<state dir>/prometheus.yml` and its data in `<state dir>/prometheus/`.
Each service's metrics URL is a static target; `job` is the service's role and `node`
its name (the labels docs/metrics.md promises).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tunemesh.errors import FailedPreconditionError, UnavailableError
from tunemesh_local import processes
from tunemesh_local.state import ProcessRecord

ROLE = "prometheus"
SCRAPE_INTERVAL_S = 1.0
READY_POLL_S = 0.1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


# The alert rules of deploy/prometheus, where a source checkout has them.
ALERT_RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "alerts.yml"


def scrape_config(targets: Iterable[ProcessRecord], interval_s: float = SCRAPE_INTERVAL_S,
                  rule_files: Iterable[Path] = ()) -> str:
    """prometheus.yml for every process that has a metrics URL, one job per role, loading
    `rule_files`."""
    jobs: dict[str, list[str]] = {}
    for record in targets:
        if record.metrics_url:
            url = urllib.parse.urlsplit(record.metrics_url)
            labels = {"node": record.name, "__metrics_path__": url.path or "/metrics"}
            jobs.setdefault(record.role, []).append(
                f"      - targets: [{json.dumps(url.netloc)}]\n        labels: {json.dumps(labels)}")
    interval = f"{interval_s:g}s"
    lines = ["global:", f"  scrape_interval: {interval}", f"  scrape_timeout: {interval}",
             f"  evaluation_interval: {interval}"]
    rules = [f"  - {json.dumps(str(path))}" for path in rule_files]
    lines += ["rule_files:", *rules] if rules else []
    lines += ["scrape_configs:" + ("" if jobs else " []")]
    for role, entries in sorted(jobs.items()):
        lines += [f"  - job_name: {json.dumps(role)}", "    static_configs:", *entries]
    return "\n".join(lines) + "\n"


def argv(config_file: Path, data_dir: Path, listen: str) -> list[str]:
    """The command line of a Prometheus on `listen` (host:port)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FailedPreconditionError("PROMETHEUS_MISSING", "no `prometheus` binary: install Debian's prometheus "
                                 "package (`make system` does)")
    return [binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={listen}", "--storage.tsdb.retention.time=7d"]


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Wait until `<url>/-/ready` answers 200; UnavailableError (with the log's tail) when the
    process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UnavailableError("PROMETHEUS_EXITED", f"prometheus exited with code {proc.returncode}; log {log_path}:\n"
                              f"{processes.tail(log_path) or '(empty)'}")
        if is_ready(url):
            return
        time.sleep(READY_POLL_S)
    raise UnavailableError("PROMETHEUS_NOT_READY", f"prometheus not ready after {timeout:.0f}s; log {log_path}:\n"
                      f"{processes.tail(log_path) or '(empty)'}")


def is_ready(url: str) -> bool:
    try:
        with _NO_PROXY.open(f"{url}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def query(url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """An instant query against the Prometheus at `url`: the `result` list of
    `/api/v1/query` (vectors: [{"metric": {labels}, "value": [time, "text"]}, ...])."""
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with _NO_PROXY.open(address, timeout=timeout) as reply:
        answer = json.load(reply)
    if answer.get("status") != "success":
        raise UnavailableError("PROMETHEUS_QUERY_FAILED", f"{promql}: {answer.get('error', answer)}")
    return answer["data"]["result"]
