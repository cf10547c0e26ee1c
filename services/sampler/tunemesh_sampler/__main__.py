"""`python -m tunemesh_sampler`: load a base model into a generation engine, serve
SamplerService, register in etcd with the adapters it holds."""

from __future__ import annotations

import asyncio
import logging

import prometheus_client

from tunemesh_internal.v1 import sampler_pb2, sampler_pb2_grpc
from tunemesh_common.service import metrics, rpc
from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_common.service.host import HostConfig, ServiceHost, etcd_registration
from tunemesh_common.models import ModelRegistry
from tunemesh_sampler import settings as settings_mod
from tunemesh_sampler.adapters import AdapterCache
from tunemesh_sampler.checkpoints import AdapterLoader
from tunemesh_sampler.core import SamplerCore
from tunemesh_sampler.server import SamplerServicer

log = logging.getLogger("tunemesh_sampler")
SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"].full_name
ENGINE_CHECK_S = 1.0  # how often the engine is asked whether it still serves


def build_engine(s: settings_mod.SamplerSettings):
    """The engine for the model: vLLM where it is installed and can serve it, else torch."""
    from tunemesh_sampler.engine import build_engine as factory

    registry = ModelRegistry.default(s.data_dir, config_file=s.models_file)
    entry = registry.entry(s.model)
    path = registry.materialize(s.model)
    return factory(
        s.engine, path, name=entry.name, family=entry.family, max_lora_rank=s.max_lora_rank or entry.max_lora_rank,
        max_seq_len=entry.max_seq_len, max_adapters=s.max_adapters, num_threads=s.num_threads or None,
        device=s.device, dtype=s.dtype, kv_cache_bytes=int(s.kv_cache_bytes),
        kv_cache_fraction=s.kv_cache_fraction, batch_invariant=s.batch_invariant,
        vllm_batch_invariant=s.vllm_batch_invariant,
    )


async def serve(s: settings_mod.SamplerSettings) -> None:
    sampler_metrics = SamplerMetrics(prometheus_client.REGISTRY)
    tls = s.mesh_tls()
    config = HostConfig("sampler", s.listen, s.metrics_listen, s.advertise_host, s.ready_file,
                        registry=sampler_metrics.registry, tls=tls, peers=frozenset({"scheduler"}))
    async with ServiceHost(config) as host:
        servicer = SamplerServicer(s.node_id, host.bind(), s.max_adapters, host.metrics_url)
        host.add_servicer(sampler_pb2_grpc.add_SamplerServiceServicer_to_server, servicer, SERVICE_NAME)
        await host.start()  # health answers NOT_SERVING while the engine loads
        log.info("sampler %s loading %s", s.node_id, s.model)
        engine = await asyncio.to_thread(build_engine, s)
        host.on_stop(engine.close)
        storage = CheckpointStorageClient(s.checkpoint, tls=tls)
        host.on_stop(storage.close)
        loader = AdapterLoader(engine, storage, s.cache_dir / s.node_id, sampler_metrics)
        core = SamplerCore(engine, AdapterCache(loader.load, loader.unload, s.max_adapters), sampler_metrics,
                           s.max_rows_per_tenant)
        servicer.attach(core)
        _follow(sampler_metrics, core, s.max_adapters)
        metrics.describe_node(sampler_metrics.registry, "sampler", s.node_id, core.info.name)
        registrations = [etcd_registration(s.etcd, "samplers", s.node_id, lambda: servicer.node().SerializeToString(),
                                           s.lease_ttl_s, 0.5, sampler_metrics.registry, "sampler", tls)] if s.etcd else []
        failed = asyncio.Event()
        watch = asyncio.create_task(watch_engine(engine, failed, ENGINE_CHECK_S), name="engine-watch")
        host.on_stop(watch.cancel)
        await host.serve(registrations, ready={"node_id": s.node_id})
        log.info("sampler %s serving %s on %s (%s engine)", s.node_id, s.model, host.address, type(engine).__name__)
        if await host.wait(failed) is not None:
            log.error("sampler %s: %s; exiting so that it is restarted (its etcd record goes with it)",
                      s.node_id, engine.failure())
            raise SystemExit(1)


async def watch_engine(engine, failed: asyncio.Event, period_s: float) -> None:
    """Set `failed` once the engine reports a failure (checked every `period_s`)."""
    while engine.failure() is None:
        await asyncio.sleep(period_s)
    failed.set()


def _follow(sampler_metrics: SamplerMetrics, core: SamplerCore, slots: int) -> None:
    """Gauges and counters read from the core and its adapter cache at scrape time."""
    adapters = core.adapters
    sampler_metrics.follow(lambda: core.active_requests, lambda: len(adapters.resident()),
                           lambda: adapters.loads, lambda: adapters.evictions, slots)


def main(argv: list[str] | None = None) -> None:
    s = settings_mod.load(argv)
    rpc.configure_logging(node=s.node_id)
    asyncio.run(serve(s))


if __name__ == "__main__":
    main()
