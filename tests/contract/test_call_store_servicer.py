"""The checkpoint service's call store (PutCall, GetCall, DeleteCalls) on an in-process
server, through the scheduler's CallStoreClient and the raw stub."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib

import grpc
import pytest

from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.server import StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server
from tunemesh_common.checkpoints.client import CallStoreClient
from tunemesh.errors import InvalidArgumentError, NotFoundError, UnavailableError, UnimplementedError, error_from_rpc

RUN = "runs/5be1"
MAX_UPLOAD = 8 << 20
TENANT = ((rpc.TENANT_KEY, "tunemesh-scheduler"),)


@contextlib.asynccontextmanager
async def checkpoint_service(root: pathlib.Path, with_calls: bool = True):
    """(address, call store) of a checkpoint service whose checkpoints live in `root`."""
    calls = FilesystemCallStore(root / "calls", fsync=False) if with_calls else None
    server, _ = build_server(rpc.trusted_tenant)
    servicer = StorageServicer(CheckpointCatalog(FilesystemStore(root, fsync=False)), 64 << 10, MAX_UPLOAD, calls)
    checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield address, calls
    finally:
        await server.stop(None)


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_calls_round_trip_in_chunks_and_are_replaced_by_a_later_put(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, calls):
            client = CallStoreClient(address, timeout_s=30, chunk_bytes=100_000)
            big = os.urandom(3 * (1 << 20) + 5)
            await client.put(RUN, 12, big)
            await client.put(RUN, 13, b"")
            assert await client.get(RUN, 12) == big
            assert await client.get(RUN, 13) == b""
            await client.put(RUN, 12, b"replaced")
            assert await client.get(RUN, 12) == b"replaced"
            assert b"".join(calls.read(RUN, 12)) == b"replaced"
            await client.close()
        # beside the checkpoints, outside every tenant's prefix
        assert sorted(p.name for p in (tmp_path / "calls" / "5be1").iterdir()) == [f"{12:020d}", f"{13:020d}"]
        assert list((tmp_path / "objects").iterdir()) == []

    run(scenario)


def test_errors_come_back_typed(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, _):
            client = CallStoreClient(address, timeout_s=30)
            with pytest.raises(NotFoundError) as info:
                await client.get(RUN, 1)
            assert info.value.reason == "CALL_NOT_FOUND"
            for bad in (lambda: client.put("runs/../etc", 1, b"x"), lambda: client.get(RUN, 0),
                        lambda: client.delete("runs/a/b"), lambda: client.delete(RUN, -3)):
                with pytest.raises(InvalidArgumentError) as info:
                    await bad()
                assert info.value.reason == "BAD_CALL_KEY"
            await client.close()
        assert not any((tmp_path / "calls").iterdir())

    run(scenario)


def test_delete_calls_through_a_seq_id_or_all(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, _):
            client = CallStoreClient(address, timeout_s=30)
            for seq_id in range(1, 6):
                await client.put(RUN, seq_id, bytes([seq_id]) * 10)
            await client.put("runs/other", 1, b"other")
            assert await client.delete(RUN, 3) == 3
            with pytest.raises(NotFoundError):
                await client.get(RUN, 3)
            assert await client.get(RUN, 4) == bytes([4]) * 10
            assert await client.delete(RUN) == 2
            assert await client.delete(RUN) == 0
            with pytest.raises(NotFoundError):
                await client.get(RUN, 5)
            assert await client.get("runs/other", 1) == b"other"
            await client.close()

    run(scenario)


def test_malformed_requests_are_refused(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, _):
            async with grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS) as channel:
                stub = checkpoint_pb2_grpc.CheckpointStorageServiceStub(channel)
                key = checkpoint_pb2.CallKey(run=RUN, seq_id=1)

                async def status(call) -> tuple[grpc.StatusCode, str]:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    return info.value.code(), error_from_rpc(info.value).reason

                async def stream(*parts):
                    for part in parts:
                        yield checkpoint_pb2.PutCallRequest(**part)

                put = lambda *parts: lambda: stub.PutCall(stream(*parts), metadata=TENANT)  # noqa: E731
                assert await status(put({"chunk": b"no key"})) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_UPLOAD")
                assert await status(put({"key": key}, {"key": key})) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_UPLOAD")
                too_big = [{"chunk": b"x" * (4 << 20)}] * 3
                assert await status(put({"key": key}, *too_big)) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                     "UPLOAD_TOO_LARGE")
                for request in (checkpoint_pb2.DeleteCallsRequest(run=RUN),
                                checkpoint_pb2.DeleteCallsRequest(run=RUN, all=False)):
                    assert await status(lambda: stub.DeleteCalls(request, metadata=TENANT)) == (
                        grpc.StatusCode.INVALID_ARGUMENT, "BAD_CALL_RANGE")
                untenanted = checkpoint_pb2.GetCallRequest(key=key)
                assert await status(lambda: stub.GetCall(untenanted).read()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                                 "MISSING_TENANT")
        assert not (tmp_path / "calls" / "5be1").exists()  # nothing of the refused puts was kept

    run(scenario)


def test_a_service_without_a_call_store_and_a_stopped_one(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path, with_calls=False) as (address, _):
            client = CallStoreClient(address, timeout_s=30)
            with pytest.raises(UnimplementedError) as info:
                await client.put(RUN, 1, b"x")
            assert info.value.reason == "NO_CALL_STORE"
        with pytest.raises(UnavailableError):  # the service is gone: a transport failure
            await client.get(RUN, 1)
        await client.close()

    run(scenario)


def test_a_full_disk_answers_resource_exhausted_disk_full_not_internal(tmp_path, monkeypatch):
    import errno

    from tunemesh.errors import ResourceExhaustedError
    from tunemesh_checkpoint import call_store as call_store_module

    def full_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if "x" in mode:
            file.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return file

    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, calls):
            client = CallStoreClient(address, timeout_s=30, chunk_bytes=100_000)
            monkeypatch.setattr(call_store_module, "open", full_disk, raising=False)
            with pytest.raises(ResourceExhaustedError) as info:
                await client.put(RUN, 3, b"a call")
            assert info.value.reason == "DISK_FULL"
            assert not any(p.is_file() for p in (tmp_path / "calls").rglob("*"))  # no partial file
            await client.close()

    run(scenario)
