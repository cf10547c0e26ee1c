"""`tunemesh up --prometheus` on a real mesh: after two rounds of training and sampling,
Prometheus holds every service's metrics with the values that traffic implies; every service answers
grpc.health.v1 and reflection."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mesh_tls import process_channel
from mesh_traffic import ANSWER, MODEL, PROMPT

from tunemesh_local import prometheus

pytestmark = pytest.mark.e2e
DATUM_TOKENS = len(PROMPT + ANSWER) - 1


def _value(url: str, promql: str) -> float:
    result = prometheus.query(url, promql)
    assert len(result) == 1, f"{promql}: {result}"
    return float(result[0]["value"][1])


def test_every_service_is_scraped_with_rpc_counts_and_etcd_state(observed_mesh):
    url, steps, rounds = observed_mesh.prometheus_url, observed_mesh.steps, observed_mesh.rounds
    for job in ("scheduler", "trainer", "sampler", "checkpoint"):
        assert _value(url, f'up{{job="{job}"}}') == 1, job
    ok = 'grpc_code="OK"'
    assert _value(url, f'sum(tunemesh_rpc_handled_total{{service="scheduler",grpc_method="ForwardBackward",{ok}}})') \
        == 2 * steps * rounds
    assert _value(url, f'sum(tunemesh_rpc_handled_total{{service="trainer",grpc_method="RunBatch",{ok}}})') >= rounds
    assert _value(url, 'sum(tunemesh_rpc_handled_total{service="scheduler",grpc_method="GetCheckpoint",'
                       'grpc_code="NOT_FOUND"})') == rounds
    assert _value(url, 'sum(tunemesh_rpc_duration_seconds_count{service="sampler",grpc_method="Sample"})') == rounds
    for service in ("scheduler", "trainer", "sampler"):
        assert _value(url, f'tunemesh_etcd_up{{service="{service}"}}') == 1, service
    for service in ("trainer", "sampler"):
        assert _value(url, f'tunemesh_node_lease_held{{service="{service}"}}') == 1, service
    assert _value(url, f'tunemesh_node_info{{service="trainer",node_id="trainer-0",model="{MODEL}"}}') == 1


def test_scheduler_queues_batches_and_tenant_tokens(observed_mesh):
    url, steps, rounds = observed_mesh.prometheus_url, observed_mesh.steps, observed_mesh.rounds
    for tenant in ("alice", "bob"):
        assert _value(url, f'tunemesh_scheduler_tokens_total{{tenant="{tenant}",kind="forward_backward"}}') \
            == steps * DATUM_TOKENS * rounds
        assert _value(url, f'tunemesh_scheduler_queue_wait_seconds_count{{tenant="{tenant}"}}') >= 2 * steps * rounds
        assert _value(url, f'tunemesh_scheduler_queue_depth{{tenant="{tenant}"}}') == 0
    # every forward_backward and optim_step of both tenants, and alice's forward, went in fused batches
    assert _value(url, "sum(tunemesh_scheduler_batch_items_sum)") == (2 * 2 * steps + 1) * rounds
    assert _value(url, "sum(tunemesh_scheduler_batch_tokens_sum)") == (2 * steps + 1) * DATUM_TOKENS * rounds
    assert _value(url, 'tunemesh_scheduler_operations_finished_total{tenant="alice",kind="optim_step",'
                       'state="SUCCEEDED"}') == steps * rounds
    assert _value(url, 'tunemesh_scheduler_nodes{role="trainer"}') == 1
    assert _value(url, 'tunemesh_scheduler_nodes{role="sampler"}') == 1


def test_trainer_sampler_and_checkpoint_figures(observed_mesh):
    url, steps, rounds = observed_mesh.prometheus_url, observed_mesh.steps, observed_mesh.rounds
    assert _value(url, 'tunemesh_trainer_tokens_total{kind="forward_backward"}') == 2 * steps * DATUM_TOKENS * rounds
    assert _value(url, 'tunemesh_trainer_tokens_total{kind="forward"}') == DATUM_TOKENS * rounds
    assert _value(url, 'tunemesh_trainer_items_total{kind="optim_step"}') == 2 * steps * rounds
    assert _value(url, "tunemesh_trainer_step_duration_seconds_count") >= rounds
    # a 60 s window: by the time this runs (other tests first) it may be 0 again; it was not while training
    assert _value(url, "max_over_time(tunemesh_trainer_tokens_per_second[1h])") > 0
    assert _value(url, 'tunemesh_trainer_adapters_loaded_total{source="new"}') == 2 * rounds
    # bob's runs deleted; alice's frozen (slot released) when her session ended
    assert _value(url, "tunemesh_trainer_adapters_unloaded_total") == 2 * rounds
    assert _value(url, "tunemesh_trainer_adapters_resident") == 0
    generated = _value(url, "tunemesh_sampler_generated_tokens_total")
    assert 0 < generated <= 2 * len(ANSWER) * rounds
    assert _value(url, "max_over_time(tunemesh_sampler_tokens_per_second[1h])") > 0
    assert _value(url, 'tunemesh_sampler_prompt_tokens_total{kind="logprobs"}') == len(PROMPT + ANSWER) * rounds
    # the scheduler's per-tenant view of the same sampling: all of it alice's
    assert _value(url, 'tunemesh_scheduler_sampling_tokens_total{tenant="alice",kind="generated"}') == generated
    assert _value(url, 'tunemesh_scheduler_sampling_tokens_total{tenant="alice",kind="prompt"}') == len(PROMPT) * rounds
    assert _value(url, 'tunemesh_scheduler_sampling_tokens_total{tenant="alice",kind="logprobs"}') \
        == len(PROMPT + ANSWER) * rounds
    assert prometheus.query(url, 'tunemesh_scheduler_sampling_tokens_total{tenant="bob"}') == []
    assert _value(url, "tunemesh_sampler_adapters_loaded_total") == rounds
    assert _value(url, 'tunemesh_sampler_adapter_load_duration_seconds_count{result="ok"}') == rounds
    assert _value(url, "tunemesh_sampler_adapters_resident") == rounds
    written, read = _value(url, "tunemesh_checkpoint_write_bytes_total"), _value(url, "tunemesh_checkpoint_read_bytes_total")
    assert written > 1000 and read > 1000  # the sampler read back (at least) the weights alice saved
    assert _value(url, 'tunemesh_checkpoint_op_duration_seconds_count{op="commit",result="ok"}') == rounds


def test_every_service_serves_health_and_reflection(observed_mesh):
    services = [p for p in observed_mesh.mesh.processes if p.role not in ("etcd", "prometheus")]
    assert sorted(p.role for p in services) == ["checkpoint", "sampler", "scheduler", "trainer"]
    for record in services:
        with process_channel(observed_mesh.mesh, record) as channel:  # TLS: the mesh's admin certificate
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, record.name
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                          timeout=10))
            names = {s.name for s in answer.list_services_response.service}
            assert "grpc.health.v1.Health" in names and any(n.startswith("tunemesh.") for n in names), (record.name, names)


def test_status_shows_live_figures_and_nodes_publish_their_metrics_url(observed_mesh):
    from tunemesh_local import status

    view = status.collect_status(observed_mesh.mesh)
    live = view["live"]
    assert {name: figures["metrics"] for name, figures in live.items()} == {
        "checkpoint": "ok", "trainer-0": "ok", "sampler-0": "ok", "scheduler": "ok"}
    assert live["scheduler"]["queued"] == 0 and set(live["scheduler"]["queued_by_tenant"]) == {"alice", "bob"}
    rounds = observed_mesh.rounds
    assert live["trainer-0"]["adapters"] == 0 and live["trainer-0"]["tokens_per_second"] is not None  # runs frozen
    assert live["sampler-0"]["adapters"] == rounds and live["sampler-0"]["adapter_slots"] >= rounds
    urls = {p.name: p.metrics_url for p in observed_mesh.mesh.processes}
    assert [(t["node_id"], t["metrics_url"]) for t in view["trainers"]] == [("trainer-0", urls["trainer-0"])]
    assert urls["trainer-0"].startswith("http://127.0.0.1:")


def test_the_local_prometheus_evaluates_the_alert_rules_and_none_fires(observed_mesh):
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{observed_mesh.prometheus_url}/api/v1/rules", timeout=10) as reply:
        groups = json.load(reply)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 7 and all(rule["health"] == "ok" for rule in rules), rules
    assert [rule["name"] for rule in rules if rule["state"] == "firing"] == []  # a healthy mesh
