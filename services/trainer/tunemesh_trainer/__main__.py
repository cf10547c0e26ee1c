"""`python -m tunemesh_trainer`: load a base model, serve TrainerService, register in etcd.

With `--ranks W` (W > 1) this process is rank 0 of a DeepSpeed group and starts ranks
1..W-1 on this host; under torchrun or the deepspeed launcher (RANK in the environment)
rank 0 serves and every other rank follows its engine calls.
"""

from __future__ import annotations

import asyncio
import logging
import os

import prometheus_client

from tunemesh_internal.v1 import trainer_pb2, trainer_pb2_grpc
from tunemesh_common import metrics, rpc
from tunemesh_common.checkpoint_client import CheckpointStorageClient
from tunemesh_common.models import ModelRegistry, tokenizer_files
from tunemesh_trainer import settings as settings_mod
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.engine import rank_group
from tunemesh_trainer.server import TrainerServicer

log = logging.getLogger("tunemesh_trainer")
RANK_LOST_EXIT = 3
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def build_core(
    s: settings_mod.TrainerSettings, group: rank_group.RankGroup | None = None,
    trainer_metrics: metrics.TrainerMetrics | None = None,
) -> tuple[TrainerCore, dict[str, bytes]]:
    """Materialise the model (cached), load it into the torch engine, or into a DeepSpeed
    engine on every rank of `group`."""
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(s.data_dir, config_file=s.models_file)
    entry = registry.entry(s.model)
    path = registry.materialize(s.model)
    kwargs = dict(name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                  max_seq_len=entry.max_seq_len, num_threads=s.num_threads or None,
                  max_batch_tokens=s.max_batch_tokens, dtype=s.dtype)
    if group is None:
        engine = build_torch_engine(path, **kwargs)
    else:
        engine = group.build(model_dir=path, expert_parallel=s.expert_parallel, **kwargs)
    return TrainerCore(engine, s.max_adapters, trainer_metrics), tokenizer_files(path)


async def serve(s: settings_mod.TrainerSettings, group: rank_group.RankGroup | None = None) -> None:
    trainer_metrics = metrics.TrainerMetrics(prometheus_client.REGISTRY)
    endpoint = await metrics.MetricsEndpoint.start(s.metrics_listen, trainer_metrics.registry, s.advertise_host)
    metrics_url = endpoint.url if endpoint else ""
    server, health = rpc.build_server(metrics=metrics.RpcMetrics("trainer", trainer_metrics.registry))
    port = server.add_insecure_port(s.listen)
    address = f"{s.advertise_host}:{port}"
    storage = CheckpointStorageClient(s.checkpoint)
    servicer = TrainerServicer(s.node_id, address, metrics_url, checkpoints=storage)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    rpc.enable_reflection(server, [SERVICE_NAME])
    await server.start()  # health answers NOT_SERVING while the model loads
    log.info("trainer %s loading %s", s.node_id, s.model)
    core, tokenizer = await asyncio.to_thread(build_core, s, group, trainer_metrics)
    servicer.attach(core, tokenizer)
    trainer_metrics.follow(core.adapter_count, core.max_adapters)
    metrics.describe_node(trainer_metrics.registry, "trainer", s.node_id, core.info.name)
    await rpc.mark_serving(health, [SERVICE_NAME])
    registration = await _register(s, servicer, trainer_metrics)
    if s.ready_file is not None:
        rpc.write_ready_file(s.ready_file, {"address": address, "pid": os.getpid(), "node_id": s.node_id,
                                            "metrics_url": metrics_url})
    log.info("trainer %s serving %s on %s", s.node_id, s.model, address)
    await rpc.wait_for_termination()
    if registration is not None:
        await registration.stop()
    await server.stop(grace=2)
    await storage.close()
    servicer.core.close()
    if endpoint is not None:
        await endpoint.close()


async def _register(s: settings_mod.TrainerSettings, servicer: TrainerServicer, trainer_metrics: metrics.TrainerMetrics):
    """Register the node in etcd (if configured), its record kept current, its etcd and lease
    state in metrics; None without etcd."""
    if not s.etcd:
        return None
    from tunemesh_common.registry import NodeRegistration

    registration = await NodeRegistration.start_following(
        s.etcd, "trainers", s.node_id, lambda: servicer.node().SerializeToString(), s.lease_ttl_s, 1.0)
    metrics.follow_etcd(trainer_metrics.registry, "trainer", lambda: registration.etcd_up, lambda: registration.lease_held)
    return registration


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    s = settings_mod.load(argv)
    launched = rank_group.launched_rank()
    world = int(os.environ["WORLD_SIZE"]) if launched is not None else s.ranks
    if s.expert_parallel < 1 or world % s.expert_parallel:
        raise SystemExit(f"tunemesh_trainer: --expert-parallel {s.expert_parallel} must divide the {world} rank(s) of this trainer (--ranks)")
    if s.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"tunemesh_trainer: --dtype must be float32 or bfloat16, got {s.dtype!r}")
    if launched:  # a follower rank started by torchrun / deepspeed
        rank_group.serve_rank(rank_group.join_group())
        return
    if launched == 0:
        group = rank_group.RankGroup(rank_group.join_group())
    elif s.ranks > 1:
        group = rank_group.shared_local_group(s.ranks, threads=s.num_threads, on_worker_exit=_rank_lost)
    else:
        group = None
    asyncio.run(serve(s, group))
    if launched == 0:
        group.close()


def _rank_lost(rank: int, code: int) -> None:
    """A local rank died: the group's collectives cannot complete, so the trainer stops now
    (its lease lapses and the scheduler re-places its runs) instead of hanging."""
    log.error("rank %d exited with code %d; the trainer cannot go on without it and exits", rank, code)
    logging.shutdown()
    os._exit(RANK_LOST_EXIT)


if __name__ == "__main__":
    main()
