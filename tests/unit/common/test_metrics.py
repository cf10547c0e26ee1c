"""tunemesh_common.service.metrics: every metric registers and is documented in docs/metrics.md
(name and type), callback families, the throughput window, the /metrics endpoint."""

from __future__ import annotations

import asyncio
import pathlib
import re
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tunemesh_common.service import metrics
from tunemesh_checkpoint.metrics import CheckpointMetrics
from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_trainer.metrics import TrainerMetrics

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def _every_metric(registry: CollectorRegistry) -> None:
    """What the four services register (each on its own registry in real life)."""
    metrics.RpcMetrics("scheduler", registry)
    snapshot = {"queued_by_tenant": {}, "operations_by_state": {}, "nodes": {}, "runs": 0, "sessions_open": 0}
    SchedulerMetrics(registry).follow(lambda: snapshot, lambda: {})
    TrainerMetrics(registry).follow(lambda: 0, 4)
    SamplerMetrics(registry).follow(lambda: 0, lambda: 0, lambda: 0, lambda: 0, 4)
    CheckpointMetrics(registry)
    metrics.follow_etcd(registry, "trainer", lambda: True, lambda: True)
    metrics.describe_node(registry, "trainer", "trainer-0", "tiny")


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `(tunemesh_[a-z_]+)` \| (counter|gauge|histogram) \|", DOC.read_text(), re.M)
    return dict(rows)


def test_every_registered_metric_is_documented_with_its_type_and_vice_versa():
    registry = CollectorRegistry()
    _every_metric(registry)
    registered = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        registered[name] = family.type
    documented = _documented()
    assert len(documented) > 30
    assert registered == documented


def test_every_metric_name_starts_with_tunemesh_and_carries_a_unit_or_total():
    for name, kind in _documented().items():
        assert name.startswith("tunemesh_")
        if kind == "counter":
            assert name.endswith("_total")
        if kind == "histogram" and "batch_" not in name:
            assert name.endswith("_seconds")


def test_readings_keep_every_label_set_seen_at_zero():
    values = {("alice",): 3, ("bob",): 1}
    registry = CollectorRegistry()
    registry.register(metrics.ReadingsCollector("tunemesh_x_depth", "doc", ("tenant",), lambda: values))
    assert registry.get_sample_value("tunemesh_x_depth", {"tenant": "alice"}) == 3
    values = {("bob",): 2}
    assert registry.get_sample_value("tunemesh_x_depth", {"tenant": "alice"}) == 0
    assert registry.get_sample_value("tunemesh_x_depth", {"tenant": "bob"}) == 2


def test_a_failing_reading_leaves_the_rest_of_the_scrape_intact():
    registry = CollectorRegistry()
    registry.register(metrics.ReadingsCollector("tunemesh_x_broken", "doc", (), lambda: 1 / 0))
    registry.register(metrics.ReadingsCollector("tunemesh_x_fine", "doc", (), lambda: {(): 2}))
    assert registry.get_sample_value("tunemesh_x_fine") == 2
    assert registry.get_sample_value("tunemesh_x_broken") is None


def test_readings_as_a_counter_family():
    registry = CollectorRegistry()
    registry.register(metrics.ReadingsCollector("tunemesh_x_loads", "doc", (), lambda: {(): 7}, "counter"))
    assert registry.get_sample_value("tunemesh_x_loads_total") == 7


def test_throughput_window_averages_over_the_window_and_forgets_old_amounts():
    now = [100.0]
    window = metrics.ThroughputWindow(window_s=10.0, clock=lambda: now[0])
    window.add(50)
    now[0] = 105.0
    window.add(30)
    assert window.per_second() == 8.0
    now[0] = 112.0  # the first amount is older than the window
    assert window.per_second() == 3.0
    now[0] = 200.0
    assert window.per_second() == 0.0


def test_trainer_step_feeds_tokens_items_and_the_window():
    registry = CollectorRegistry()
    trainer = TrainerMetrics(registry)
    trainer.step(0.5, {"forward_backward": 120, "forward": 30}, {"forward_backward": 2, "forward": 1, "optim_step": 2})
    get = registry.get_sample_value
    assert get("tunemesh_trainer_tokens_total", {"kind": "forward_backward"}) == 120
    assert get("tunemesh_trainer_items_total", {"kind": "optim_step"}) == 2
    assert get("tunemesh_trainer_step_duration_seconds_sum") == 0.5
    assert get("tunemesh_trainer_tokens_per_second") == pytest.approx(150 / 60)


def test_timed_blocks_record_their_result():
    from tunemesh.errors import NotFoundError

    registry = CollectorRegistry()
    checkpoint = CheckpointMetrics(registry)
    with checkpoint.op("list"):
        pass
    for error in (NotFoundError("NOPE", "gone"), OSError("disk")):
        with pytest.raises(type(error)), checkpoint.op("manifest"):
            raise error
    count = lambda op, result: registry.get_sample_value(  # noqa: E731
        "tunemesh_checkpoint_op_duration_seconds_count", {"op": op, "result": result})
    assert (count("list", "ok"), count("manifest", "not_found"), count("manifest", "error")) == (1, 1, 1)


def test_etcd_gauges_read_their_callbacks_at_scrape_time():
    registry, up = CollectorRegistry(), [True]
    metrics.follow_etcd(registry, "sampler", lambda: up[0], lambda: False)
    assert registry.get_sample_value("tunemesh_etcd_up", {"service": "sampler"}) == 1
    up[0] = False
    assert registry.get_sample_value("tunemesh_etcd_up", {"service": "sampler"}) == 0
    assert registry.get_sample_value("tunemesh_node_lease_held", {"service": "sampler"}) == 0


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_endpoint_serves_the_registry_and_nothing_else():
    registry = CollectorRegistry()
    metrics.RpcMetrics("checkpoint", registry).start("/a.B/C").finish("OK")

    async def main():
        endpoint = await metrics.MetricsEndpoint.start("127.0.0.1:0", registry)
        try:
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", endpoint.url)
            ok = await asyncio.to_thread(_fetch, endpoint.url)
            missing = await asyncio.to_thread(_fetch, endpoint.url.replace("/metrics", "/other"))
        finally:
            await endpoint.close()
        return ok, missing

    (status, body), (missing, _) = asyncio.run(main())
    assert status == 200 and missing == 404
    families = {f.name: f for f in text_string_to_metric_families(body)}
    sample = next(s for s in families["tunemesh_rpc_handled"].samples if s.name == "tunemesh_rpc_handled_total")
    assert sample.labels == {"service": "checkpoint", "grpc_service": "a.B", "grpc_method": "C", "grpc_code": "OK"}
    assert sample.value == 1


def test_an_empty_listen_address_serves_nothing_and_a_wildcard_advertises_a_name():
    async def main():
        assert await metrics.MetricsEndpoint.start("", CollectorRegistry()) is None
        endpoint = await metrics.MetricsEndpoint.start("0.0.0.0:0", CollectorRegistry(), advertise_host="node-7")
        await endpoint.close()
        return endpoint.url

    assert re.fullmatch(r"http://node-7:\d+/metrics", asyncio.run(main()))


def test_healthz_answers_while_running_and_readyz_follows_the_ready_callback():
    """The probes' paths (Kubernetes probes cannot speak TLS): /healthz from the start,
    /readyz 503 until `ready()` turns true, then 200; a failing callback reads as not ready."""
    state = {"ready": False}

    def ready() -> bool:
        if state["ready"] is None:
            raise RuntimeError("broken")
        return state["ready"]

    async def main():
        endpoint = await metrics.MetricsEndpoint.start("127.0.0.1:0", CollectorRegistry(), ready=ready)
        base = endpoint.url.removesuffix("/metrics")
        seen = []
        try:
            for value in (False, True, None):
                state["ready"] = value
                seen.append((await asyncio.to_thread(_fetch, f"{base}/healthz"),
                             await asyncio.to_thread(_fetch, f"{base}/readyz?verbose=1")))
        finally:
            await endpoint.close()
        return seen

    assert asyncio.run(main()) == [((200, "ok\n"), (503, "")), ((200, "ok\n"), (200, "ready\n")),
                                   ((200, "ok\n"), (503, ""))]


def test_readyz_without_a_ready_callback_is_not_served():
    async def main():
        endpoint = await metrics.MetricsEndpoint.start("127.0.0.1:0", CollectorRegistry())
        base = endpoint.url.removesuffix("/metrics")
        try:
            return (await asyncio.to_thread(_fetch, f"{base}/readyz"),
                    await asyncio.to_thread(_fetch, f"{base}/healthz"))
        finally:
            await endpoint.close()

    assert asyncio.run(main()) == ((404, ""), (200, "ok\n"))
