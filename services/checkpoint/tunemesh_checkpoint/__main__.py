"""`python -m tunemesh_checkpoint`: durable adapter checkpoints on a filesystem root."""

from __future__ import annotations

import asyncio
import logging

import prometheus_client

from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from tunemesh_checkpoint import settings as settings_mod
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.handoff import HandoffDir
from tunemesh_checkpoint.metered_store import MeteredStore
from tunemesh_checkpoint.quota import TenantUsage
from tunemesh_checkpoint.server import CheckpointServicer, StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.service import rpc
from tunemesh_checkpoint.metrics import CheckpointMetrics
from tunemesh_common.service.host import HostConfig, ServiceHost

log = logging.getLogger("tunemesh_checkpoint")
CHECKPOINT_SERVICE = checkpoints_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name
STORAGE_SERVICE = checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointStorageService"].full_name


async def sweep_periodically(catalog: CheckpointCatalog, interval_s: float, handoff: HandoffDir | None) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(catalog.sweep)
            if handoff is not None:
                await asyncio.to_thread(handoff.sweep)
        except Exception:  # a bad sweep must not stop the service; the next one retries
            log.exception("expiry sweep failed")


_STORAGE = f"/{STORAGE_SERVICE}/"
# Who may call what: the scheduler everything (the public checkpoint API it proxies, the
# calls it keeps here); trainers write and read checkpoints; samplers only read them.
PEERS = {
    "": frozenset({"scheduler"}),
    _STORAGE + "WriteCheckpoint": frozenset({"scheduler", "trainer"}),
    _STORAGE + "AdoptCheckpoint": frozenset({"scheduler", "trainer"}),
    _STORAGE + "ReadCheckpoint": frozenset({"scheduler", "trainer", "sampler"}),
}


async def serve(s: settings_mod.CheckpointSettings) -> None:
    tls = s.mesh_tls()
    registry = prometheus_client.REGISTRY
    store = MeteredStore(FilesystemStore(s.root_dir), CheckpointMetrics(registry))
    calls = FilesystemCallStore(s.root_dir / "calls")  # beside objects/: no tenant's prefix
    recovered = await asyncio.to_thread(store.recover) + await asyncio.to_thread(calls.recover)
    usage = await asyncio.to_thread(TenantUsage.counted, store, s.max_bytes_per_tenant)
    catalog = CheckpointCatalog(store, usage=usage)
    await asyncio.to_thread(catalog.sweep)
    handoff = None
    if s.handoff_dir is not None:
        handoff = HandoffDir(s.handoff_dir, s.root_dir, s.handoff_max_age_s)
        await asyncio.to_thread(handoff.sweep)
    config = HostConfig("checkpoint", s.listen, s.metrics_listen, ready_file=s.ready_file,
                        authenticator=rpc.trusted_tenant, registry=registry, grace_s=5.0,
                        tls=tls, peers=PEERS)
    async with ServiceHost(config) as host:
        host.add_servicer(checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server,
                          CheckpointServicer(catalog, s.chunk_bytes, s.max_upload_bytes), CHECKPOINT_SERVICE)
        host.add_servicer(checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server,
                          StorageServicer(catalog, s.chunk_bytes, s.max_upload_bytes, calls, handoff), STORAGE_SERVICE)
        await host.serve()
        host.spawn(sweep_periodically(catalog, s.sweep_interval_s, handoff), "expiry-sweep")
        log.info("checkpoint service on %s, root %s (%d interrupted writes cleaned up)",
                 host.address, s.root_dir, recovered)
        await host.wait()


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
