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
from tunemesh_common.service import metrics, rpc
from tunemesh_trainer.metrics import TrainerMetrics
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_common.service.host import HostConfig, ServiceHost, etcd_registration
from tunemesh_common.models import ModelRegistry, tokenizer_files
from tunemesh_trainer import settings as settings_mod
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer import ranks
from tunemesh_trainer.engine.rank_group import RankGroup, serve_rank
from tunemesh_trainer.server import TrainerServicer

log = logging.getLogger("tunemesh_trainer")
RANK_LOST_EXIT = 3
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def build_core(
    s: settings_mod.TrainerSettings, group: RankGroup | None = None,
    trainer_metrics: TrainerMetrics | None = None,
) -> tuple[TrainerCore, dict[str, bytes]]:
    """Materialise the model (cached), load it into the torch engine, or into a DeepSpeed
    engine on every rank of `group`."""
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(s.data_dir, config_file=s.models_file)
    entry = registry.entry(s.model)
    path = registry.materialize(s.model)
    kwargs = dict(name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                  max_seq_len=entry.max_seq_len, num_threads=s.num_threads or None,
                  max_batch_tokens=s.max_batch_tokens, dtype=s.dtype,
                  batch_invariant=s.batch_invariant)
    if group is None:
        engine = build_torch_engine(path, device=s.device, **kwargs)
    else:  # each rank on its accelerator's device
        engine = group.build(model_dir=path, expert_parallel=s.expert_parallel, **kwargs)
    return TrainerCore(engine, s.max_adapters, trainer_metrics), tokenizer_files(path)


async def serve(s: settings_mod.TrainerSettings, group: RankGroup | None = None) -> None:
    trainer_metrics = TrainerMetrics(prometheus_client.REGISTRY)
    tls = s.mesh_tls()
    config = HostConfig("trainer", s.listen, s.metrics_listen, s.advertise_host, s.ready_file,
                        registry=trainer_metrics.registry, tls=tls, peers=frozenset({"scheduler"}))
    async with ServiceHost(config) as host:
        storage = CheckpointStorageClient(s.checkpoint, tls=tls, handoff_dir=s.checkpoint_handoff_dir)
        host.on_stop(storage.close)
        servicer = TrainerServicer(s.node_id, host.bind(), host.metrics_url, checkpoints=storage)
        host.add_servicer(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME)
        await host.start()  # health answers NOT_SERVING while the model loads
        log.info("trainer %s loading %s", s.node_id, s.model)
        core, tokenizer = await asyncio.to_thread(build_core, s, group, trainer_metrics)
        host.on_stop(core.close)
        servicer.attach(core, tokenizer)
        trainer_metrics.follow(core.adapter_count, core.max_adapters)
        metrics.describe_node(trainer_metrics.registry, "trainer", s.node_id, core.info.name)
        registrations = [etcd_registration(s.etcd, "trainers", s.node_id, lambda: servicer.node().SerializeToString(),
                                           s.lease_ttl_s, 1.0, trainer_metrics.registry, "trainer", tls)] if s.etcd else []
        await host.serve(registrations, ready={"node_id": s.node_id})
        log.info("trainer %s serving %s on %s", s.node_id, s.model, host.address)
        await host.wait()


def main(argv: list[str] | None = None) -> None:
    s = settings_mod.load(argv)
    rpc.configure_logging(node=s.node_id)
    launched = ranks.launched_rank()
    world = int(os.environ["WORLD_SIZE"]) if launched is not None else s.ranks
    if world % s.expert_parallel:
        raise SystemExit(f"tunemesh_trainer: --expert-parallel {s.expert_parallel} must divide the {world} rank(s) of this trainer (--ranks)")
    if launched:  # a follower rank started by torchrun / deepspeed
        serve_rank(ranks.join_group())
        return
    if launched == 0:
        group = ranks.group_with_keepalive(ranks.join_group())
    elif s.ranks > 1:
        group = ranks.shared_local_group(s.ranks, threads=s.num_threads, on_worker_exit=_rank_lost)
    else:
        group = None
    try:
        asyncio.run(serve(s, group))
    finally:
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
