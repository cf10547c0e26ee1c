"""`python -m tunemesh_sampler`: load a base model into a generation engine, serve
SamplerService, register in etcd with the adapters it holds."""

from __future__ import annotations

import asyncio
import logging
import os

import prometheus_client

from tunemesh_internal.v1 import sampler_pb2, sampler_pb2_grpc
from tunemesh_common import metrics, rpc
from tunemesh_common.checkpoint_client import CheckpointStorageClient
from tunemesh_common.models import ModelRegistry
from tunemesh_sampler import settings as settings_mod
from tunemesh_sampler.adapters import AdapterCache
from tunemesh_sampler.checkpoints import AdapterLoader
from tunemesh_sampler.core import SamplerCore
from tunemesh_sampler.server import SamplerServicer

log = logging.getLogger("tunemesh_sampler")
SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"].full_name


def build_engine(s: settings_mod.SamplerSettings):
    """The engine for the model: vLLM where it is installed and can serve it, else torch."""
    from tunemesh_sampler.engine import build_engine as factory

    registry = ModelRegistry.default(s.data_dir, config_file=s.models_file)
    entry = registry.entry(s.model)
    path = registry.materialize(s.model)
    return factory(
        s.engine, path, name=entry.name, family=entry.family, max_lora_rank=s.max_lora_rank or entry.max_lora_rank,
        max_seq_len=entry.max_seq_len, max_adapters=s.max_adapters, num_threads=s.num_threads or None,
    )


async def serve(s: settings_mod.SamplerSettings) -> None:
    sampler_metrics = metrics.SamplerMetrics(prometheus_client.REGISTRY)
    endpoint = await metrics.MetricsEndpoint.start(s.metrics_listen, sampler_metrics.registry, s.advertise_host)
    metrics_url = endpoint.url if endpoint else ""
    server, health = rpc.build_server(metrics=metrics.RpcMetrics("sampler", sampler_metrics.registry))
    port = server.add_insecure_port(s.listen)
    address = f"{s.advertise_host}:{port}"
    servicer = SamplerServicer(s.node_id, address, s.max_adapters, metrics_url)
    sampler_pb2_grpc.add_SamplerServiceServicer_to_server(servicer, server)
    rpc.enable_reflection(server, [SERVICE_NAME])
    await server.start()  # health answers NOT_SERVING while the engine loads
    log.info("sampler %s loading %s", s.node_id, s.model)
    engine = await asyncio.to_thread(build_engine, s)
    storage = CheckpointStorageClient(s.checkpoint)
    loader = AdapterLoader(engine, storage, s.cache_dir / s.node_id, sampler_metrics)
    core = SamplerCore(engine, AdapterCache(loader.load, loader.unload, s.max_adapters), sampler_metrics)
    servicer.attach(core)
    _follow(sampler_metrics, core, s.max_adapters)
    metrics.describe_node(sampler_metrics.registry, "sampler", s.node_id, core.info.name)
    await rpc.mark_serving(health, [SERVICE_NAME])
    registration = await _register(s, servicer, sampler_metrics)
    if s.ready_file is not None:
        rpc.write_ready_file(s.ready_file, {"address": address, "pid": os.getpid(), "node_id": s.node_id,
                                            "metrics_url": metrics_url})
    log.info("sampler %s serving %s on %s (%s engine)", s.node_id, s.model, address, type(engine).__name__)
    await rpc.wait_for_termination()
    if registration is not None:
        await registration.stop()
    await server.stop(grace=2)
    await storage.close()
    engine.close()
    if endpoint is not None:
        await endpoint.close()


def _follow(sampler_metrics: metrics.SamplerMetrics, core: SamplerCore, slots: int) -> None:
    """Gauges and counters read from the core and its adapter cache at scrape time."""
    adapters = core.adapters
    sampler_metrics.follow(lambda: core.active_requests, lambda: len(adapters.resident()),
                           lambda: adapters.loads, lambda: adapters.evictions, slots)


async def _register(s: settings_mod.SamplerSettings, servicer: SamplerServicer, sampler_metrics: metrics.SamplerMetrics):
    """Register the node in etcd (if configured), its record kept current, its etcd and lease
    state in metrics; None without etcd."""
    if not s.etcd:
        return None
    from tunemesh_common.registry import NodeRegistration

    registration = await NodeRegistration.start_following(
        s.etcd, "samplers", s.node_id, lambda: servicer.node().SerializeToString(), s.lease_ttl_s, 0.5)
    metrics.follow_etcd(sampler_metrics.registry, "sampler", lambda: registration.etcd_up, lambda: registration.lease_held)
    return registration


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
