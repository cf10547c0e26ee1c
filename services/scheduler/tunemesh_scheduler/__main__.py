"""`python -m tunemesh_scheduler`: the public front door of the mesh."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

import prometheus_client

from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc, sampling_pb2, sampling_pb2_grpc
from tunemesh.v1 import operations_pb2, operations_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from tunemesh.v1 import training_pb2, training_pb2_grpc
from tunemesh_common.membership import leadership, registry
from tunemesh_common.service import api_keys as api_keys_mod
from tunemesh_common.service import metrics, rpc
from tunemesh_common.service.throttle import FailureThrottle
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_common.checkpoints.client import CallStoreClient
from tunemesh_common.service.host import HostConfig, ServiceHost
from tunemesh_common.security.tls import MeshTls
from tunemesh_scheduler import settings as settings_mod
from tunemesh_scheduler.core import SchedulerConfig, SchedulerCore
from tunemesh_scheduler.nodes import EtcdPlacement, SamplerDirectory, TrainerDirectory
from tunemesh_scheduler.sampler_client import GrpcSamplerPort, SamplerRouter
from tunemesh_scheduler import takeover
from tunemesh_scheduler.checkpoints import CheckpointProxy
from tunemesh_scheduler.durable import EtcdRunStore
from tunemesh_scheduler.liveness import DeathWatch, local_leader_gone
from tunemesh_scheduler.server import (
    CheckpointServicer, OperationServicer, SamplingServicer, SessionServicer, TrainingServicer,
)
from tunemesh_scheduler.tokenizers import TokenizerCache
from tunemesh_scheduler.trainer_client import GrpcTrainerPort
from tunemesh_scheduler.validation import Limits

log = logging.getLogger("tunemesh_scheduler")


def _service(module, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name


@dataclasses.dataclass
class _Parts:
    """What the scheduler is made of, built once its host runs (each closed by the host)."""

    directory: TrainerDirectory
    sampler_directory: SamplerDirectory
    samplers: SamplerRouter
    checkpoints: CheckpointProxy
    trainers: GrpcTrainerPort
    store: EtcdRunStore | None
    election: leadership.LeaderElection
    core: SchedulerCore


def build_authenticator(s: settings_mod.SchedulerSettings) -> api_keys_mod.KeyAuthenticator:
    """The keys file's keys (hashed), plus the inline ones with --insecure-dev-keys.
    Raises SystemExit saying what to do when there are none, or inline keys without the flag."""
    inline = settings_mod.api_keys(s)
    if inline and not s.insecure_dev_keys:
        raise SystemExit("--api-keys holds plain-text keys: development only, add --insecure-dev-keys true to use them; "
                         "otherwise make a keys file with `tunemesh keys create --tenant T --file F` "
                         "and pass --api-keys-file F")
    if s.api_keys_file is None and not inline:
        raise SystemExit("no API keys: pass --api-keys-file F (make one with `tunemesh keys create --tenant T "
                         "--file F`), or for development --insecure-dev-keys true --api-keys key=tenant,...")
    if inline:
        log.warning("accepting %d plain-text development API keys (--insecure-dev-keys)", len(inline))
    try:
        ring = api_keys_mod.KeyRing(s.api_keys_file, [api_keys_mod.hash_key(k, t) for k, t in inline.items()],
                                    check_every_s=s.api_keys_check_s)
    except api_keys_mod.KeyFileError as err:
        raise SystemExit(f"cannot use the API keys: {err}") from None
    throttle = FailureThrottle(s.auth_max_failures, s.auth_window_s, s.auth_block_s)
    return api_keys_mod.KeyAuthenticator(ring, throttle)


SMALL_REQUEST_BYTES = 1 << 20  # every unary RPC without training data or prompts
PROMPT_REQUEST_BYTES = 4 << 20  # a prompt of up to 8192 tokens, with room to spare


def request_limits(max_request_bytes: int) -> rpc.MessageLimits:
    """Each public RPC's largest request: training data (ForwardBackward, Forward) up to
    `max_request_bytes` (the server's limit), prompts (Sample, ComputeLogprobs) 4 MiB,
    everything else 1 MiB. ImportCheckpoint streams chunks and keeps the server's limit."""
    training = f"/{_service(training_pb2, 'TrainingService')}/"
    sampling = f"/{_service(sampling_pb2, 'SamplingService')}/"
    return rpc.MessageLimits({training + "ForwardBackward": max_request_bytes, training + "Forward": max_request_bytes,
                              sampling + "Sample": PROMPT_REQUEST_BYTES,
                              sampling + "ComputeLogprobs": PROMPT_REQUEST_BYTES}, default=SMALL_REQUEST_BYTES)


async def serve(s: settings_mod.SchedulerSettings) -> None:
    authenticator = build_authenticator(s)
    tls = s.mesh_tls()
    scheduler_metrics = SchedulerMetrics(prometheus_client.REGISTRY)
    config = HostConfig("scheduler", s.listen, s.metrics_listen, ready_file=s.ready_file,
                        authenticator=authenticator, registry=scheduler_metrics.registry,
                        max_receive_bytes=s.max_request_bytes, limits=request_limits(s.max_request_bytes),
                        tls=tls)  # public: server TLS, API keys
    async with ServiceHost(config) as host:
        parts = await _build(s, host, scheduler_metrics, tls)
        host.write_ready(s.listen, role="standby")
        log.info("scheduler standing by for the leadership (%s)", s.listen)
        token = await parts.election.campaign()
        await _take_over(parts, token)
        _add_servicers(host, s, parts, scheduler_metrics)
        await host.serve(ready={"role": "leader"})
        log.info("scheduler leading and serving on %s (token %d, %d tenants' keys, etcd %s)", host.address, token,
                 len(authenticator.ring.tenants()), s.etcd)
        if await host.wait(parts.election.lost) is not None:
            # No call and no etcd write of this leadership may follow: start over as a fresh
            # process (same pid, command line and address) that stands by and campaigns again.
            log.error("lost the leadership: starting over as a standby")
            logging.shutdown()
            os.execv(sys.executable, sys.orig_argv)


async def _build(s: settings_mod.SchedulerSettings, host: ServiceHost,
                 scheduler_metrics: SchedulerMetrics, tls: MeshTls | None) -> _Parts:
    """Watch trainers and samplers in etcd, connect to them and to the checkpoint service,
    start the core; each part is stopped by `host` once its server has stopped."""
    etcd = registry.connect(s.etcd, tls=tls)
    directory, sampler_directory = TrainerDirectory(), SamplerDirectory()
    watcher = await registry.NodeWatcher.start(etcd, "trainers", on_change=directory.on_change)
    host.on_stop(watcher.stop)
    sampler_watcher = await registry.NodeWatcher.start(etcd, "samplers", on_change=sampler_directory.on_change)
    host.on_stop(sampler_watcher.stop)
    samplers = SamplerRouter(sampler_directory, GrpcSamplerPort(sampler_directory.address_of, s.sampler_timeout_s, tls))
    host.on_stop(samplers.close)
    placement = EtcdPlacement(directory, registry.PlacementTable(etcd))
    checkpoints = CheckpointProxy(s.checkpoint, s.checkpoint_timeout_s, tls)
    host.on_stop(checkpoints.close)
    trainers = GrpcTrainerPort(directory.address_of, s.trainer_timeout_s, checkpoints, tls)
    host.on_stop(trainers.close)
    deaths = DeathWatch("trainer", directory.address_of, watcher.lease_of, watcher.expire)
    trainers.on_unavailable = deaths.suspect  # a crashed trainer's runs move before its lease lapses
    host.on_stop(deaths.close)
    call_store = CallStoreClient(s.checkpoint, s.checkpoint_timeout_s, tls=tls) if s.durable and s.checkpoint else None
    if call_store is not None:
        host.on_stop(call_store.close)
    store = EtcdRunStore(etcd, call_store) if s.durable else None
    election = leadership.LeaderElection(
        etcd, "scheduler", s.listen.encode(), s.leader_ttl_s,
        gone=lambda leader: local_leader_gone(leader.decode(errors="replace"), s.listen))
    host.on_stop(election.resign)  # after the core has stopped
    config = SchedulerConfig(
        gap_timeout_s=s.gap_timeout_s, batch_token_budget=s.batch_token_budget, batch_wait_s=s.batch_wait_ms / 1000,
        merge_wait_s=s.merge_wait_ms / 1000,
        fair_share_grace_s=s.fair_share_grace_ms / 1000, max_ops_ahead=s.max_ops_ahead,
        finished_ttl_s=s.finished_ttl_s, max_runs_per_tenant=s.max_runs_per_tenant,
        max_queued_ops_per_tenant=s.max_queued_ops_per_tenant,
        max_queued_tokens_per_tenant=s.max_queued_tokens_per_tenant,
        store_timeout_s=s.store_timeout_s, snapshot_every_steps=s.snapshot_every_steps,
        snapshot_every_s=s.snapshot_every_s, session_timeout_s=s.session_timeout_s,
        snapshot_min_interval_s=s.snapshot_min_interval_s, snapshot_replay_budget_s=s.snapshot_replay_budget_s,
        restore_hold_s=s.restore_hold_s, recover_alone=s.recover_alone, journal_linger_s=s.journal_linger_ms / 1000,
        journal_defer_s=s.journal_defer_ms / 1000,
    )
    core = SchedulerCore(placement, trainers, config, metrics=scheduler_metrics, store=store)
    await core.start()
    host.on_stop(core.stop)
    _follow(scheduler_metrics, core, (directory, sampler_directory), (watcher, sampler_watcher))
    return _Parts(directory, sampler_directory, samplers, checkpoints, trainers, store, election, core)


async def _take_over(parts: _Parts, token: int) -> None:
    """Lead with fencing token `token`: fence the store and the nodes, recover the journaled
    state and move the runs of trainers that are gone."""
    core, directory, trainers = parts.core, parts.directory, parts.trainers
    trainers.leader_token = parts.samplers.leader_token = token
    if parts.store is not None:
        parts.store.fence(parts.election.key, token)
        plan = await takeover.load_plan(parts.store)
        adapters_lost = await takeover.fence_runs(plan, trainers)
        await takeover.free_orphans(plan, trainers, list(directory.nodes()))
        core.recover(plan)
        for node in {r.run.node_id for r in plan.runs if r.run.node_id} - set(directory.nodes()):
            core.node_lost(node)  # its runs move to a live trainer
        for run in adapters_lost:
            core.relocate(run)  # rebuilt from its snapshot and log (on the same node if it is the one)
    directory.on_leave = core.node_lost
    directory.on_join = lambda node: core.node_joined(node, directory.models_of(node))


def _add_servicers(host: ServiceHost, s: settings_mod.SchedulerSettings, parts: _Parts,
                   scheduler_metrics: SchedulerMetrics) -> None:
    core, directory, checkpoints = parts.core, parts.directory, parts.checkpoints
    limits = Limits(s.max_datums, s.max_tokens, s.max_samples)
    host.add_servicer(sessions_pb2_grpc.add_SessionServiceServicer_to_server,
                      SessionServicer(core, directory, limits, TokenizerCache(directory, parts.trainers)),
                      _service(sessions_pb2, "SessionService"))
    host.add_servicer(training_pb2_grpc.add_TrainingServiceServicer_to_server,
                      TrainingServicer(core, directory, limits, checkpoints), _service(training_pb2, "TrainingService"))
    host.add_servicer(operations_pb2_grpc.add_OperationServiceServicer_to_server,
                      OperationServicer(core, s.wait_cap_s), _service(operations_pb2, "OperationService"))
    host.add_servicer(checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server,
                      CheckpointServicer(checkpoints, directory), _service(checkpoints_pb2, "CheckpointService"))
    host.add_servicer(sampling_pb2_grpc.add_SamplingServiceServicer_to_server,
                      SamplingServicer(core, parts.samplers, checkpoints, limits, scheduler_metrics),
                      _service(sampling_pb2, "SamplingService"))


def _follow(scheduler_metrics: SchedulerMetrics, core: SchedulerCore,
            directories: tuple[TrainerDirectory, SamplerDirectory], watchers: tuple[registry.NodeWatcher, ...]) -> None:
    """Gauges over the core's snapshot, the node directories and etcd, read at scrape time."""
    trainers, samplers = directories
    scheduler_metrics.follow(core.snapshot, lambda: {"trainer": len(trainers.nodes()), "sampler": len(samplers.nodes())})
    metrics.follow_etcd(scheduler_metrics.registry, "scheduler", lambda: all(w.connected for w in watchers))


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
