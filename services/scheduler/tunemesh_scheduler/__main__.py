"""`python -m tunemesh_scheduler`: the public front door of the mesh."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import prometheus_client

from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc, sampling_pb2, sampling_pb2_grpc
from tunemesh.v1 import operations_pb2, operations_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from tunemesh.v1 import training_pb2, training_pb2_grpc
from tunemesh_common import leadership, metrics, registry, rpc
from tunemesh_common.checkpoint_client import CallStoreClient
from tunemesh_scheduler import settings as settings_mod
from tunemesh_scheduler.core import SchedulerConfig, SchedulerCore
from tunemesh_scheduler.nodes import EtcdPlacement, SamplerDirectory, TrainerDirectory
from tunemesh_scheduler.sampler_client import GrpcSamplerPort, SamplerRouter
from tunemesh_scheduler import takeover
from tunemesh_scheduler.checkpoints import CheckpointProxy
from tunemesh_scheduler.durable import EtcdRunStore
from tunemesh_scheduler.server import (
    CheckpointServicer, OperationServicer, SamplingServicer, SessionServicer, TrainingServicer,
)
from tunemesh_scheduler.tokenizers import TokenizerCache
from tunemesh_scheduler.trainer_client import GrpcTrainerPort
from tunemesh_scheduler.validation import Limits

log = logging.getLogger("tunemesh_scheduler")
SERVICES = [
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
    operations_pb2.DESCRIPTOR.services_by_name["OperationService"].full_name,
    checkpoints_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name,
    sampling_pb2.DESCRIPTOR.services_by_name["SamplingService"].full_name,
]


async def serve(s: settings_mod.SchedulerSettings) -> None:
    keys = settings_mod.api_keys(s)
    if not keys:
        raise SystemExit("no API keys: pass --api-keys-file or --api-keys key=tenant,...")
    etcd = registry.connect(s.etcd)
    directory = TrainerDirectory()
    watcher = await registry.NodeWatcher.start(etcd, "trainers", on_change=directory.on_change)
    sampler_directory = SamplerDirectory()
    sampler_watcher = await registry.NodeWatcher.start(etcd, "samplers", on_change=sampler_directory.on_change)
    samplers = SamplerRouter(sampler_directory, GrpcSamplerPort(sampler_directory.address_of, s.sampler_timeout_s))
    placement = EtcdPlacement(directory, registry.PlacementTable(etcd))
    checkpoints = CheckpointProxy(s.checkpoint, s.checkpoint_timeout_s)
    trainers = GrpcTrainerPort(directory.address_of, s.trainer_timeout_s, checkpoints)
    config = SchedulerConfig(
        s.gap_timeout_s, s.batch_token_budget, s.batch_wait_ms / 1000, s.max_ops_ahead, s.finished_ttl_s,
        s.max_runs_per_tenant, store_timeout_s=s.store_timeout_s, snapshot_every_steps=s.snapshot_every_steps,
        snapshot_every_s=s.snapshot_every_s, session_timeout_s=s.session_timeout_s,
        snapshot_min_interval_s=s.snapshot_min_interval_s, journal_linger_s=s.journal_linger_ms / 1000,
    )
    scheduler_metrics = metrics.SchedulerMetrics(prometheus_client.REGISTRY)
    call_store = CallStoreClient(s.checkpoint, s.checkpoint_timeout_s) if s.durable and s.checkpoint else None
    store = EtcdRunStore(etcd, call_store) if s.durable else None
    core = SchedulerCore(placement, trainers, config, metrics=scheduler_metrics, store=store)
    await core.start()
    endpoint = await _serve_metrics(s, scheduler_metrics, core, (directory, sampler_directory), (watcher, sampler_watcher))
    election = leadership.LeaderElection(etcd, "scheduler", s.listen.encode(), s.leader_ttl_s)
    _write_ready(s, s.listen, endpoint, "standby")
    log.info("scheduler standing by for the leadership (%s)", s.listen)
    token = await election.campaign()
    trainers.leader_token = samplers.leader_token = token
    if store is not None:
        store.fence(election.key, token)
        plan = await takeover.load_plan(store)
        adapters_lost = await takeover.fence_runs(plan, trainers)
        await takeover.free_orphans(plan, trainers, list(directory.nodes()))
        core.recover(plan)
        for node in {r.run.node_id for r in plan.runs if r.run.node_id} - set(directory.nodes()):
            core.node_lost(node)  # its runs move to a live trainer
        for run in adapters_lost:
            core.relocate(run)  # rebuilt from its snapshot and log (on the same node if it is the one)
    directory.on_leave, directory.on_join = core.node_lost, core.node_joined
    limits = Limits(s.max_datums, s.max_tokens, s.max_samples)
    server, health = rpc.build_server(
        rpc.KeyFileAuthenticator(keys), metrics.RpcMetrics("scheduler", scheduler_metrics.registry)
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(
        SessionServicer(core, directory, limits, TokenizerCache(directory, trainers)), server
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(
        TrainingServicer(core, directory, limits, checkpoints), server
    )
    checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(CheckpointServicer(checkpoints, directory), server)
    sampling_pb2_grpc.add_SamplingServiceServicer_to_server(SamplingServicer(core, samplers, checkpoints, limits, scheduler_metrics), server)
    operations_pb2_grpc.add_OperationServiceServicer_to_server(OperationServicer(core, s.wait_cap_s), server)
    rpc.enable_reflection(server, SERVICES)
    port = server.add_insecure_port(s.listen)
    await server.start()
    await rpc.mark_serving(health, SERVICES)
    address = f"{s.listen.rsplit(':', 1)[0]}:{port}"
    _write_ready(s, address, endpoint, "leader")
    log.info("scheduler leading and serving on %s (token %d, %d tenants' keys, etcd %s)", address, token,
             len(set(keys.values())), s.etcd)
    if await _terminated_or_deposed(election):
        # No call and no etcd write of this leadership may follow: start over as a fresh
        # process (same pid, command line and address) that stands by and campaigns again.
        log.error("lost the leadership: starting over as a standby")
        logging.shutdown()
        os.execv(sys.executable, sys.orig_argv)
    await server.stop(grace=2)
    await core.stop()
    await election.resign()
    await watcher.stop()
    await sampler_watcher.stop()
    await samplers.close()
    await trainers.close()
    await checkpoints.close()
    if call_store is not None:
        await call_store.close()
    if endpoint is not None:
        await endpoint.close()


async def _serve_metrics(s: settings_mod.SchedulerSettings, scheduler_metrics: metrics.SchedulerMetrics,
                         core: SchedulerCore, directories: tuple[TrainerDirectory, SamplerDirectory],
                         watchers: tuple[registry.NodeWatcher, ...]) -> metrics.MetricsEndpoint | None:
    """Gauges over the core's snapshot, the node directories and etcd; the /metrics endpoint."""
    trainers, samplers = directories
    scheduler_metrics.follow(core.snapshot, lambda: {"trainer": len(trainers.nodes()), "sampler": len(samplers.nodes())})
    metrics.follow_etcd(scheduler_metrics.registry, "scheduler", lambda: all(w.connected for w in watchers))
    return await metrics.MetricsEndpoint.start(s.metrics_listen, scheduler_metrics.registry)


def _write_ready(s: settings_mod.SchedulerSettings, address: str, endpoint, role: str) -> None:
    if s.ready_file is not None:
        rpc.write_ready_file(s.ready_file, {"address": address, "pid": os.getpid(), "role": role,
                                            "metrics_url": endpoint.url if endpoint else ""})


async def _terminated_or_deposed(election: leadership.LeaderElection) -> bool:
    """Wait for SIGTERM/SIGINT (False) or the loss of the leadership (True)."""
    terminated = asyncio.ensure_future(rpc.wait_for_termination())
    lost = asyncio.ensure_future(election.lost.wait())
    await asyncio.wait([terminated, lost], return_when=asyncio.FIRST_COMPLETED)
    terminated.cancel()
    return lost.done()


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
