"""EtcdRunStore with a real etcd and a real checkpoint service (in-process): calls over
INLINE_PAYLOAD_BYTES live in the checkpoint service's call store, etcd names them; trims
and run deletions drop them there too; a call store that is down fails the whole apply."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import pytest

from tunemesh_internal.v1 import checkpoint_pb2_grpc
from tunemesh_internal.v1 import scheduler_state_pb2 as pb
from tunemesh.v1 import types_pb2
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.server import StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.membership import registry
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server
from tunemesh_common.checkpoints.client import CallStoreClient
from tunemesh.errors import UnavailableError
from tunemesh_scheduler.core import DataWork, OperationRecord, OpKind, OpState, RunRecord
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.durable import INLINE_PAYLOAD_BYTES, EtcdRunStore, calls_prefix

pytestmark = pytest.mark.e2e

MIB = 1 << 20


class CheckpointService:
    """The checkpoint service's storage servicer on a fixed loopback port, stoppable and
    startable again (same port, same root)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root, self.port, self.server = root, 0, None
        self.calls = FilesystemCallStore(root / "calls", fsync=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server, _ = build_server(rpc.trusted_tenant)
        catalog = CheckpointCatalog(FilesystemStore(self.root, fsync=False))
        checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server(
            StorageServicer(catalog, 256 << 10, 1 << 30, self.calls), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(None)

    def kept(self) -> list[str]:
        """run id/seq_id of every call kept, sorted."""
        root = self.calls.root
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@contextlib.asynccontextmanager
async def mesh_store(etcd_endpoint: str, root: pathlib.Path):
    """(EtcdRunStore with a call store, the checkpoint service, the etcd client)."""
    service = CheckpointService(root)
    await service.start()
    calls = CallStoreClient(service.address, timeout_s=30)
    try:
        async with registry.connect(etcd_endpoint) as client:
            yield EtcdRunStore(client, calls), service, client
    finally:
        await calls.close()
        await service.stop()


def _run(**fields) -> RunRecord:
    return RunRecord(name="runs/r1", tenant="t1", session="sessions/s1", base_model="tiny",
                     lora=types_pb2.LoraConfig(rank=8, alpha=16.0), node_id="node-a", create_time=11.0, **fields)


def _op(seq_id: int, state: OpState = OpState.QUEUED, **fields) -> OperationRecord:
    return OperationRecord(name=f"operations/r1-{seq_id}", tenant="t1", run="runs/r1", seq_id=seq_id,
                           kind=OpKind.FORWARD_BACKWARD, request_id=f"req-{seq_id}", payload_digest=b"d",
                           num_tokens=4, node_id="", create_time=12.0, state=state,
                           end_time=13.0 if state.done else None, **fields)


def _call(seq_id: int, size: int) -> DataWork:
    datum = types_pb2.Datum(loss_fn_inputs={"weights": types_pb2.TensorData(
        dtype=types_pb2.DTYPE_FLOAT32, shape=[size // 4], data=bytes([seq_id % 256]) * size)})
    return DataWork((datum,), "cross_entropy", {}, backward=True)


async def _etcd_calls(client) -> dict[int, pb.StoredPayload]:
    prefix = calls_prefix("runs/r1")
    return {int(kv.key[len(prefix):]): pb.StoredPayload.FromString(kv.value) for kv in await client.get_prefix(prefix)}


def _seq(seq_id: int) -> str:
    return f"r1/{seq_id:020d}"


def test_a_large_call_round_trips_through_the_call_store_and_a_trim_deletes_it(etcd_endpoint, tmp_path):
    async def scenario() -> None:
        async with mesh_store(etcd_endpoint, tmp_path) as (store, service, client):
            large, small = _call(1, MIB), _call(2, 1024)
            await store.apply([StoreWrite(_run()), StoreWrite(_op(1), payload=large), StoreWrite(_op(2), payload=small)])
            in_etcd = await _etcd_calls(client)
            assert in_etcd[1].WhichOneof("payload") == "call_store"  # etcd only names it
            assert in_etcd[1].ByteSize() < 100 and in_etcd[1].call_store.size_bytes > MIB
            assert in_etcd[2].WhichOneof("payload") == "forward_backward"  # a small call stays inline
            assert service.kept() == [_seq(1)]

            assert (await store.load()).payloads == {("runs/r1", 1): large, ("runs/r1", 2): small}
            assert await store.payloads("runs/r1", 0) == {1: large, 2: small}
            assert await store.payloads("runs/r1", 1) == {2: small}

            await store.apply([StoreWrite(_run(snapshot_seq_id=1), trim_through=1)])
            assert sorted(await _etcd_calls(client)) == [2]
            assert service.kept() == []
            assert await store.payloads("runs/r1", 0) == {2: small}

            # a trim in the batch that keeps the call: put first, deleted last
            await store.apply([StoreWrite(_op(3), payload=_call(3, MIB)),
                               StoreWrite(_run(snapshot_seq_id=3), trim_through=3)])
            assert await _etcd_calls(client) == {} and service.kept() == []

    asyncio.run(scenario())


def test_load_fetches_only_queued_calls_and_a_replay_fetches_the_rest(etcd_endpoint, tmp_path):
    async def scenario() -> None:
        async with mesh_store(etcd_endpoint, tmp_path) as (store, _, _client):
            calls = {seq_id: _call(seq_id, MIB) for seq_id in (1, 2)}
            await store.apply([StoreWrite(_run())] + [StoreWrite(_op(s), payload=c) for s, c in calls.items()])
            await store.apply([StoreWrite(_op(1, OpState.SUCCEEDED, result=types_pb2.ForwardBackwardResult()))])
            assert (await store.load()).payloads == {("runs/r1", 2): calls[2]}  # what recovery resumes
            assert await store.payloads("runs/r1", 0) == calls  # what a move replays

    asyncio.run(scenario())


def test_with_the_checkpoint_service_stopped_apply_is_unavailable_and_writes_nothing(etcd_endpoint, tmp_path):
    async def scenario() -> None:
        async with mesh_store(etcd_endpoint, tmp_path) as (store, service, client):
            await store.apply([StoreWrite(_run())])
            await service.stop()
            batch = [StoreWrite(_op(1), payload=_call(1, 1024)), StoreWrite(_op(2), payload=_call(2, MIB)),
                     StoreWrite(_run(last_seq_id=2))]
            with pytest.raises(UnavailableError) as info:
                await store.apply(batch)
            assert info.value.reason == "CALL_STORE_UNAVAILABLE"
            assert await _etcd_calls(client) == {}  # no pointer, and nothing else of the batch
            state = await store.load()
            assert state.runs == [_run()] and state.operations == []

            await service.start()  # back on its port: the journal's retry of the group goes through
            await _until_applied(store, batch)
            assert sorted(await _etcd_calls(client)) == [1, 2]
            assert await store.payloads("runs/r1", 0) == {1: _call(1, 1024), 2: _call(2, MIB)}

    asyncio.run(scenario())


def test_deleting_a_run_deletes_its_calls_from_the_call_store(etcd_endpoint, tmp_path):
    async def scenario() -> None:
        async with mesh_store(etcd_endpoint, tmp_path) as (store, service, client):
            await store.apply([StoreWrite(_run())] + [StoreWrite(_op(s), payload=_call(s, MIB)) for s in (1, 2)])
            assert service.kept() == [_seq(1), _seq(2)]
            await store.apply([StoreWrite(_run(), delete=True)])
            assert service.kept() == [] and not (service.calls.root / "r1").exists()
            assert [kv.key for kv in await client.get_prefix(f"{registry.ROOT}/".encode())] == []

    asyncio.run(scenario())


def test_a_call_store_that_lost_or_damaged_a_call_or_cannot_delete_breaks_nothing(etcd_endpoint, tmp_path):
    async def scenario() -> None:
        async with mesh_store(etcd_endpoint, tmp_path) as (store, service, _client):
            calls = {seq_id: _call(seq_id, MIB) for seq_id in (1, 2, 3)}
            await store.apply([StoreWrite(_run())] + [StoreWrite(_op(s), payload=c) for s, c in calls.items()])
            service.calls.delete("runs/r1", 1)  # lost
            service.calls.put("runs/r1", 2, [b"not the call etcd names"])  # damaged
            assert await store.payloads("runs/r1", 0) == {3: calls[3]}  # a move then fails CALL_NOT_KEPT
            assert (await store.load()).payloads == {("runs/r1", 3): calls[3]}  # clients re-send 1 and 2

            await service.stop()
            with pytest.raises(UnavailableError) as info:
                await store.payloads("runs/r1", 0)  # a move retries
            assert info.value.reason == "CALL_STORE_UNAVAILABLE"
            # a trim while the call store is down: etcd drops the calls anyway
            await store.apply([StoreWrite(_run(snapshot_seq_id=3), trim_through=3)])
            await service.start()
            assert service.kept() == [_seq(2), _seq(3)]  # left over, never read again
            assert await store.payloads("runs/r1", 0) == {}
            new = _call(3, 2 * MIB)  # a later put of a left-over key replaces it
            await _until_applied(store, [StoreWrite(_op(3), payload=new)])  # the client reconnects
            assert await store.payloads("runs/r1", 0) == {3: new}

    asyncio.run(scenario())


def test_without_a_call_store_a_large_call_is_not_kept(etcd_endpoint):
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            await store.apply([StoreWrite(_run()), StoreWrite(_op(1), payload=_call(1, INLINE_PAYLOAD_BYTES + 1)),
                               StoreWrite(_op(2), payload=_call(2, 1024))])
            assert await store.payloads("runs/r1", 0) == {2: _call(2, 1024)}
            assert sorted(await _etcd_calls(client)) == [2]

    asyncio.run(scenario())


async def _until_applied(store: EtcdRunStore, writes, timeout_s: float = 15.0) -> None:
    """Apply `writes`, retrying while the client reconnects to a restarted service."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await store.apply(writes)
        except UnavailableError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
