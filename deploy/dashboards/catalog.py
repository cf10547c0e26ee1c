"""The five tunemesh dashboards: fleet overview, per-tenant usage, trainer, sampler, checkpoint.

Every query uses only metrics of docs/metrics.md. Counters are read as `rate` (per second)
or `increase` over the dashboard's range; histograms as `histogram_quantile` over
`sum by (le)` of their bucket rates, or as mean (`_sum` rate over `_count` rate).
"""

from __future__ import annotations

from collections.abc import Callable

from deploy.dashboards.layout import Query, dashboard, label_variable, stat_panel, timeseries_panel
from deploy.dashboards.promql import (MESH_JOBS, NO_HEALTH, SERVER_ERROR_CODES, error_ratio, in_range, mean,
                                      quantile, rate)


def fleet() -> dict:
    rows = [
        ("Health", [
            stat_panel("Trainers registered", "Trainers in etcd, as the scheduler sees them.",
                       [Query('sum(tunemesh_scheduler_nodes{role="trainer"})')]),
            stat_panel("Samplers registered", "Samplers in etcd, as the scheduler sees them.",
                       [Query('sum(tunemesh_scheduler_nodes{role="sampler"})')]),
            stat_panel("Processes down", "Mesh processes Prometheus failed to scrape.",
                       [Query(f"sum(1 - up{{{MESH_JOBS}}})")], red_at=1),
            stat_panel("Nodes without lease", "Trainers and samplers whose etcd lease is not confirmed.",
                       [Query("sum(1 - tunemesh_node_lease_held)")], red_at=1),
            stat_panel("Processes cut off from etcd", "Processes whose last exchange with etcd failed.",
                       [Query("sum(1 - tunemesh_etcd_up)")], red_at=1),
            stat_panel("Operations queued", "Operations submitted, not yet handed to a trainer.",
                       [Query("sum(tunemesh_scheduler_queue_depth)")]),
        ]),
        ("Requests", [
            timeseries_panel("Requests/s by service", "gRPC calls served (health checks left out).",
                             [Query(rate("tunemesh_rpc_handled_total", NO_HEALTH, "service"), "{{service}}")], "reqps"),
            timeseries_panel("Server error ratio by service",
                             f"Calls ending {SERVER_ERROR_CODES.replace('|', ', ')} over all calls.",
                             [Query(error_ratio("", "service"), "{{service}}")], "percentunit"),
            timeseries_panel("Failed requests/s by code", "Calls ending in any status but OK, caller errors included.",
                             [Query(rate("tunemesh_rpc_handled_total", 'grpc_code!="OK"', "service, grpc_code"),
                                    "{{service}} {{grpc_code}}")], "reqps"),
            timeseries_panel("Public API latency p95 by method", "Scheduler's public RPCs; WaitOperation (a long poll) "
                             "left out.", [Query(quantile(0.95, "tunemesh_rpc_duration_seconds",
                                                          'service="scheduler", grpc_service=~"tunemesh.v1.+", '
                                                          'grpc_method!="WaitOperation"', "grpc_method"),
                                                 "{{grpc_method}}")], "s"),
        ]),
        ("Work", [
            timeseries_panel("Tokens/s: training and sampling", "Tokens trainers processed and samplers generated.",
                             [Query(rate("tunemesh_trainer_tokens_total", by="kind"), "trained {{kind}}"),
                              Query(rate("tunemesh_sampler_generated_tokens_total"), "sampled")]),
            timeseries_panel("Queue depth by tenant", "Operations submitted, not yet handed to a trainer.",
                             [Query("sum by (tenant) (tunemesh_scheduler_queue_depth)", "{{tenant}}")]),
            timeseries_panel("Operations held by state", "Operations the scheduler holds.",
                             [Query("sum by (state) (tunemesh_scheduler_operations)", "{{state}}")]),
            timeseries_panel("Adapter slots in use", "Adapters resident over slots, all nodes of a role.",
                             [Query("sum(tunemesh_trainer_adapters_resident) / sum(tunemesh_trainer_adapter_slots)",
                                    "trainers"),
                              Query("sum(tunemesh_sampler_adapters_resident) / sum(tunemesh_sampler_adapter_slots)",
                                    "samplers")], "percentunit"),
        ]),
        ("Processes", [
            timeseries_panel("Resident memory by process", "",
                             [Query(f"sum by (node) (process_resident_memory_bytes{{{MESH_JOBS}}})", "{{node}}")],
                             "bytes"),
            timeseries_panel("CPU cores used by process", "",
                             [Query(rate("process_cpu_seconds_total", MESH_JOBS, "node"), "{{node}}")]),
        ]),
    ]
    return dashboard("tunemesh-fleet", "tunemesh / Fleet overview",
                     "Health, traffic, errors and work of the whole mesh.", [], rows)


def tenants() -> dict:
    tenant = 'tenant=~"$tenant"'
    rows = [
        ("Usage in range", [
            stat_panel("Training tokens", "Tokens of forward and forward-backward operations handed to trainers.",
                       [Query(in_range("tunemesh_scheduler_tokens_total", tenant))], width=6),
            stat_panel("Sampling tokens, by kind", "Prompt and generated tokens of Sample, prompt tokens of "
                       "ComputeLogprobs.",
                       [Query(in_range("tunemesh_scheduler_sampling_tokens_total", tenant, "kind"), "{{kind}}")],
                       width=6),
            stat_panel("Operations finished, by state", "",
                       [Query(in_range("tunemesh_scheduler_operations_finished_total", tenant, "state"), "{{state}}")],
                       width=8),
            stat_panel("Operations queued now", "", [Query(f"sum(tunemesh_scheduler_queue_depth{{{tenant}}})")],
                       width=4),
        ]),
        ("Sampling", [
            timeseries_panel("Sampling tokens/s by tenant and kind", "",
                             [Query(rate("tunemesh_scheduler_sampling_tokens_total", tenant, "tenant, kind"),
                                    "{{tenant}} {{kind}}")]),
        ]),
        ("Training", [
            timeseries_panel("Training tokens/s by tenant and kind", "",
                             [Query(rate("tunemesh_scheduler_tokens_total", tenant, "tenant, kind"),
                                    "{{tenant}} {{kind}}")]),
            timeseries_panel("Operations finished/s by tenant and state", "",
                             [Query(rate("tunemesh_scheduler_operations_finished_total", tenant, "tenant, state"),
                                    "{{tenant}} {{state}}")], "ops"),
        ]),
        ("Queue", [
            timeseries_panel("Queue depth by tenant", "Operations submitted, not yet handed to a trainer.",
                             [Query(f"sum by (tenant) (tunemesh_scheduler_queue_depth{{{tenant}}})", "{{tenant}}")],
                             width=8),
            timeseries_panel("Queue wait p95 by tenant", "Submission until a trainer gets the operation.",
                             [Query(quantile(0.95, "tunemesh_scheduler_queue_wait_seconds", tenant, "tenant"),
                                    "{{tenant}}")], "s", width=8),
            timeseries_panel("Mean queue wait by tenant", "",
                             [Query(mean("tunemesh_scheduler_queue_wait_seconds", tenant, "tenant"), "{{tenant}}")],
                             "s", width=8),
        ]),
    ]
    return dashboard("tunemesh-tenants", "tunemesh / Tenant usage",
                     "Training and sampling tokens, operations and queueing of each tenant.",
                     [label_variable("tenant", "Tenant", "tunemesh_scheduler_queue_depth")], rows)


def trainer() -> dict:
    node, service = 'node=~"$node"', 'service="trainer", node=~"$node"'
    step = "tunemesh_trainer_step_duration_seconds"
    rows = [
        ("Now", [
            stat_panel("Tokens/s (last 60 s)", "", [Query(f"sum(tunemesh_trainer_tokens_per_second{{{node}}})")]),
            stat_panel("Step time p95", "", [Query(quantile(0.95, step, node))], "s"),
            stat_panel("Adapters resident", "", [Query(f"sum(tunemesh_trainer_adapters_resident{{{node}}})")]),
            stat_panel("Adapter slots", "", [Query(f"sum(tunemesh_trainer_adapter_slots{{{node}}})")]),
            stat_panel("Operations ready", "Operations the trainers' next batches may take.",
                       [Query('sum(tunemesh_scheduler_ready_depth{trainer=~"$node"})')]),
            stat_panel("Leases lost", "Trainers whose etcd lease is not confirmed.",
                       [Query(f"sum(1 - tunemesh_node_lease_held{{{service}}})")], red_at=1),
        ]),
        ("Throughput", [
            timeseries_panel("Tokens/s by node and kind", "",
                             [Query(rate("tunemesh_trainer_tokens_total", node, "node, kind"), "{{node}} {{kind}}")]),
            timeseries_panel("Items/s by kind", "Forward, forward-backward and optimizer-step items executed.",
                             [Query(rate("tunemesh_trainer_items_total", node, "kind"), "{{kind}}")], "ops"),
        ]),
        ("Steps and fused batches", [
            timeseries_panel("Step time", "Engine time of one fused batch and its optimizer steps.",
                             [Query(quantile(0.5, step, node), "p50"), Query(quantile(0.95, step, node), "p95"),
                              Query(mean(step, node), "mean")], "s", width=8),
            timeseries_panel("Fused batch operations", "Operations per batch the scheduler sent.",
                             [Query(mean("tunemesh_scheduler_batch_items", 'trainer=~"$node"'), "mean"),
                              Query(quantile(0.95, "tunemesh_scheduler_batch_items", 'trainer=~"$node"'), "p95")],
                             width=8),
            timeseries_panel("Fused batch tokens", "Tokens per batch the scheduler sent.",
                             [Query(mean("tunemesh_scheduler_batch_tokens", 'trainer=~"$node"'), "mean"),
                              Query(quantile(0.95, "tunemesh_scheduler_batch_tokens", 'trainer=~"$node"'), "p95")],
                             width=8),
        ]),
        ("Adapters", [
            timeseries_panel("Adapters resident and slots", "",
                             [Query(f"sum by (node) (tunemesh_trainer_adapters_resident{{{node}}})", "{{node}} resident"),
                              Query(f"sum by (node) (tunemesh_trainer_adapter_slots{{{node}}})", "{{node}} slots")]),
            timeseries_panel("Adapters loaded and unloaded/s", "",
                             [Query(rate("tunemesh_trainer_adapters_loaded_total", node, "source"), "loaded ({{source}})"),
                              Query(rate("tunemesh_trainer_adapters_unloaded_total", node), "unloaded")]),
        ]),
        ("RPC", _rpc_panels("Trainer", service)),
    ]
    return dashboard("tunemesh-trainer", "tunemesh / Trainer", "Throughput, step time, batches and adapters of trainers.",
                     [label_variable("node", "Trainer", "tunemesh_trainer_adapter_slots")], rows)


def sampler() -> dict:
    node, service = 'node=~"$node"', 'service="sampler", node=~"$node"'
    calls = f'{service}, grpc_method=~"Sample|ComputeLogprobs"'
    load = "tunemesh_sampler_adapter_load_duration_seconds"
    rows = [
        ("Now", [
            stat_panel("Tokens/s (last 60 s)", "", [Query(f"sum(tunemesh_sampler_tokens_per_second{{{node}}})")]),
            stat_panel("Requests in progress", "Sample and ComputeLogprobs calls, waiting for their adapter included.",
                       [Query(f"sum(tunemesh_sampler_requests_active{{{node}}})")]),
            stat_panel("Sample latency p95", "", [Query(quantile(0.95, "tunemesh_rpc_duration_seconds",
                                                                 f'{service}, grpc_method="Sample"'))], "s"),
            stat_panel("Adapters resident", "", [Query(f"sum(tunemesh_sampler_adapters_resident{{{node}}})")]),
            stat_panel("Adapter slots", "", [Query(f"sum(tunemesh_sampler_adapter_slots{{{node}}})")]),
            stat_panel("Leases lost", "Samplers whose etcd lease is not confirmed.",
                       [Query(f"sum(1 - tunemesh_node_lease_held{{{service}}})")], red_at=1),
        ]),
        ("Throughput", [
            timeseries_panel("Generated tokens/s by node", "",
                             [Query(rate("tunemesh_sampler_generated_tokens_total", node, "node"), "{{node}}")], width=8),
            timeseries_panel("Prompt tokens/s by kind", "",
                             [Query(rate("tunemesh_sampler_prompt_tokens_total", node, "kind"), "{{kind}}")], width=8),
            timeseries_panel("Requests in progress by node", "",
                             [Query(f"sum by (node) (tunemesh_sampler_requests_active{{{node}}})", "{{node}}")],
                             width=8),
        ]),
        ("Latency", [
            timeseries_panel("Sampling latency by method", "Call to final status on the sampler.",
                             [Query(quantile(0.5, "tunemesh_rpc_duration_seconds", calls, "grpc_method"),
                                    "p50 {{grpc_method}}"),
                              Query(quantile(0.95, "tunemesh_rpc_duration_seconds", calls, "grpc_method"),
                                    "p95 {{grpc_method}}")], "s"),
            timeseries_panel("Adapter load time", "Fetch from the checkpoint service and load into the engine.",
                             [Query(quantile(0.95, load, node, "result"), "p95 {{result}}"),
                              Query(mean(load, node, "result"), "mean {{result}}")], "s"),
        ]),
        ("Adapters", [
            timeseries_panel("Adapters resident and slots", "",
                             [Query(f"sum by (node) (tunemesh_sampler_adapters_resident{{{node}}})", "{{node}} resident"),
                              Query(f"sum by (node) (tunemesh_sampler_adapter_slots{{{node}}})", "{{node}} slots")]),
            timeseries_panel("Adapters loaded and evicted/s", "",
                             [Query(rate("tunemesh_sampler_adapters_loaded_total", node), "loaded"),
                              Query(rate("tunemesh_sampler_adapters_evicted_total", node), "evicted")]),
        ]),
        ("RPC", _rpc_panels("Sampler", service)),
    ]
    return dashboard("tunemesh-sampler", "tunemesh / Sampler", "Generation throughput, latency and adapters of samplers.",
                     [label_variable("node", "Sampler", "tunemesh_sampler_adapter_slots")], rows)


def checkpoint() -> dict:
    op = "tunemesh_checkpoint_op_duration_seconds"
    rows = [
        ("In range", [
            stat_panel("Written", "", [Query(in_range("tunemesh_checkpoint_write_bytes_total"))], "bytes", width=6),
            stat_panel("Read", "", [Query(in_range("tunemesh_checkpoint_read_bytes_total"))], "bytes", width=6),
            stat_panel("Store operations, by result", "",
                       [Query(in_range(op + "_count", by="result"), "{{result}}")], width=12),
        ]),
        ("Store", [
            timeseries_panel("Bytes/s written and read", "",
                             [Query(rate("tunemesh_checkpoint_write_bytes_total"), "written"),
                              Query(rate("tunemesh_checkpoint_read_bytes_total"), "read")], "Bps", width=8),
            timeseries_panel("Store operations/s", "",
                             [Query(rate(op + "_count", by="op, result"), "{{op}} {{result}}")], "ops", width=8),
            timeseries_panel("Store operation time p95 by operation", "",
                             [Query(quantile(0.95, op, by="op"), "{{op}}")], "s", width=8),
        ]),
        ("RPC", _rpc_panels("Checkpoint", 'service="checkpoint"')),
    ]
    return dashboard("tunemesh-checkpoint", "tunemesh / Checkpoint", "Checkpoint store traffic, operations and RPCs.",
                     [], rows)


def _rpc_panels(role: str, service: str) -> list:
    calls = f"{service}, {NO_HEALTH}"
    return [
        timeseries_panel(f"{role} RPCs/s by method and code", "Health checks left out.",
                         [Query(rate("tunemesh_rpc_handled_total", calls, "grpc_method, grpc_code"),
                                "{{grpc_method}} {{grpc_code}}")], "reqps", width=8),
        timeseries_panel(f"{role} RPC latency p95 by method", "",
                         [Query(quantile(0.95, "tunemesh_rpc_duration_seconds", calls, "grpc_method"),
                                "{{grpc_method}}")], "s", width=8),
        timeseries_panel(f"{role} server error ratio", "",
                         [Query(error_ratio(service, "grpc_method"), "{{grpc_method}}")], "percentunit", width=8),
    ]


# File name under deploy/grafana -> the dashboard.
DASHBOARDS: dict[str, Callable[[], dict]] = {
    "fleet-overview.json": fleet,
    "tenant-usage.json": tenants,
    "trainer.json": trainer,
    "sampler.json": sampler,
    "checkpoint.json": checkpoint,
}
