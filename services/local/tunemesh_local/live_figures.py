"""Live figures for `tunemesh status`, read from each process's `/metrics` (the metrics
docs/metrics.md lists): queue depth per tenant, tokens/s, adapters per node."""

from __future__ import annotations

import concurrent.futures
import urllib.error
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from tunemesh_local.state import ProcessRecord

SCRAPE_TIMEOUT_S = 2.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only

Samples = dict[str, list[tuple[dict[str, str], float]]]


def collect(records: Iterable[ProcessRecord], timeout: float = SCRAPE_TIMEOUT_S) -> dict[str, dict]:
    """process name -> {"metrics": "ok" | "unreachable" | "unreadable" | "off", figures...} for every
    process with a role that has figures; scraped concurrently."""
    records = [r for r in records if r.role in ("scheduler", "trainer", "sampler", "checkpoint")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(records))) as pool:
        texts = list(pool.map(lambda r: fetch(r.metrics_url, timeout) if r.metrics_url else None, records))
    live = {}
    for record, text in zip(records, texts):
        if not record.metrics_url:
            live[record.name] = {"metrics": "off"}
        elif text is None:
            live[record.name] = {"metrics": "unreachable"}
        else:
            try:
                live[record.name] = {"metrics": "ok", **figures(record.role, text)}
            except ValueError:  # not the exposition format
                live[record.name] = {"metrics": "unreadable"}
    return live


def fetch(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> str | None:
    """The exposition text at `url`, or None when it cannot be read."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as reply:
            return reply.read().decode()
    except (urllib.error.URLError, OSError, UnicodeDecodeError):
        return None


def figures(role: str, text: str) -> dict:
    """The figures of one process from its exposition text (None where a metric is absent)."""
    samples = parse(text)
    if role == "scheduler":
        by_tenant = {labels["tenant"]: value for labels, value in samples.get("tunemesh_scheduler_queue_depth", [])}
        return {"queued": sum(by_tenant.values()) if by_tenant else None, "queued_by_tenant": by_tenant}
    if role in ("trainer", "sampler"):
        return {"tokens_per_second": _single(samples, f"tunemesh_{role}_tokens_per_second"),
                "adapters": _single(samples, f"tunemesh_{role}_adapters_resident"),
                "adapter_slots": _single(samples, f"tunemesh_{role}_adapter_slots")}
    return {}


def parse(text: str) -> Samples:
    """sample name -> [(labels, value)] (prometheus_client's parser)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _single(samples: Samples, name: str) -> float | None:
    values = samples.get(name, [])
    return values[0][1] if len(values) == 1 else None
