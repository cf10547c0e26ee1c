"""Checkpoints handed over by rename (AdoptCheckpoint) on an in-process checkpoint
service, through the trainers' CheckpointStorageClient and the raw stub."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib

import grpc
import numpy as np
import pytest

from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh.v1 import checkpoints_pb2
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.handoff import HandoffDir
from tunemesh_checkpoint.quota import TenantUsage
from tunemesh_checkpoint.server import StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.checkpoints import handoff
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server
from tunemesh.errors import (
    DataLossError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, UnavailableError,
    error_from_rpc,
)

TENANT = "alice"
STATE = "tunemesh://runs/5be1/state/step-3"
FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors")


class _NoStreaming(StorageServicer):
    """Refuses streamed writes, so a write that succeeds was handed over."""

    async def WriteCheckpoint(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streamed writes are off in this test")


@contextlib.asynccontextmanager
async def checkpoint_service(root: pathlib.Path, with_handoff: bool = True, quota: int = 0, streaming: bool = False):
    """(address, handoff dir) of a checkpoint service whose store lives in `root`."""
    store = FilesystemStore(root, fsync=False)
    directory = HandoffDir(root / "handoff", root) if with_handoff else None
    servicer_class = StorageServicer if streaming or not with_handoff else _NoStreaming
    servicer = servicer_class(CheckpointCatalog(store, usage=TenantUsage(quota)), 64 << 10, 8 << 20,
                              handoff=directory)
    server, _ = build_server(rpc.trusted_tenant)
    checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield address, root / "handoff"
    finally:
        await server.stop(None)


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def header(path: str = STATE) -> checkpoint_pb2.WriteCheckpointHeader:
    return checkpoint_pb2.WriteCheckpointHeader(path=path, base_model="tiny-dense", step=3, has_optimizer_state=True)


def files(seed: int = 0) -> dict[str, list]:
    """A state checkpoint's files, the large ones as arrays in several parts (as a trainer encodes them)."""
    rng = np.random.default_rng(seed)
    return {
        FILES[0]: [b'{"r": 4}\n'],
        FILES[1]: [rng.standard_normal(3000).astype(np.float32), rng.standard_normal(17).astype(np.float32)],
        FILES[2]: [b"\x08" * 5, rng.standard_normal(70_000).astype(np.float32)],
    }


def joined(parts: list) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def stub_for(address: str) -> checkpoint_pb2_grpc.CheckpointStorageServiceStub:
    return checkpoint_pb2_grpc.CheckpointStorageServiceStub(grpc.aio.insecure_channel(address))


async def adopt(stub, request: checkpoint_pb2.AdoptCheckpointRequest):
    try:
        return await stub.AdoptCheckpoint(request, metadata=((rpc.TENANT_KEY, TENANT),), timeout=30)
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc(err) from None


def hand_over(directory: pathlib.Path, contents: dict[str, bytes]) -> tuple[str, list]:
    token, described = handoff.write_files(directory, {name: [data] for name, data in contents.items()})
    return token, described


def test_a_handed_over_checkpoint_reads_back_whole_and_leaves_nothing_behind(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, directory):
            client = CheckpointStorageClient(address, timeout_s=30, handoff_dir=directory)
            written = await client.write(TENANT, header(), files())
            checkpoint, read = await client.read(TENANT, STATE)  # verified against the manifest's sha256
            await client.close()
        expected = {name: joined(parts) for name, parts in files().items()}
        assert {name: bytes(data) for name, data in read.items()} == expected
        assert {f.name: (f.size_bytes, f.sha256) for f in written.files} == {
            name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in expected.items()}
        assert checkpoint.step == 3 and checkpoint.has_optimizer_state
        assert list(directory.iterdir()) == []
        assert list((tmp_path / "staging").iterdir()) == []

    run(scenario)


def test_a_service_without_a_handoff_dir_gets_the_files_streamed(tmp_path, caplog):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path / "store", with_handoff=False) as (address, _):
            directory = tmp_path / "not-the-services"
            directory.mkdir()
            client = CheckpointStorageClient(address, timeout_s=30, handoff_dir=directory)
            for index in range(2):
                await client.write(TENANT, header(f"{STATE}-{index}"), files(index))
            _, read = await client.read(TENANT, f"{STATE}-1")
            await client.close()
        assert bytes(read[FILES[2]]) == joined(files(1)[FILES[2]])
        assert list(directory.iterdir()) == []
        assert sum("has no handoff directory" in r.getMessage() for r in caplog.records) == 1

    run(scenario)


def test_the_service_answers_no_handoff_dir_when_it_has_none(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path, with_handoff=False) as (address, _):
            with pytest.raises(FailedPreconditionError) as info:
                await adopt(stub_for(address), checkpoint_pb2.AdoptCheckpointRequest(header=header(), handoff="0" * 32))
        assert info.value.reason == "NO_HANDOFF_DIR"

    run(scenario)


def _contents() -> dict[str, bytes]:
    return {FILES[0]: b"{}\n", FILES[1]: b"w" * 100, FILES[2]: b"o" * 50}


@pytest.mark.parametrize("case", ["token outside", "token not hex", "size", "symlink", "hard link", "missing file",
                                  "declared twice", "file set", "no such handoff"])
def test_bad_handoffs_are_refused_with_a_reason_and_removed(tmp_path, case):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path / "store") as (address, directory):
            token, described = hand_over(directory, _contents())
            elsewhere = tmp_path / "secret"
            elsewhere.write_bytes(b"w" * 100)
            if case == "token outside":
                token = "../../secret"
            elif case == "token not hex":
                token = "z" * 32
            elif case == "size":
                described[1].size_bytes = 99
            elif case == "symlink":
                (directory / token / FILES[1]).unlink()
                (directory / token / FILES[1]).symlink_to(elsewhere)
            elif case == "hard link":
                os.link(directory / token / FILES[1], tmp_path / "kept-name")
            elif case == "missing file":
                (directory / token / FILES[2]).unlink()
            elif case == "declared twice":
                described.append(described[0])
            elif case == "file set":
                del described[2]
            elif case == "no such handoff":
                handoff.discard(directory, token)
            request = checkpoint_pb2.AdoptCheckpointRequest(header=header(), handoff=token, files=described)
            with pytest.raises(InvalidArgumentError) as info:
                await adopt(stub_for(address), request)
            expected = "BAD_CHECKPOINT_FILES" if case == "file set" else "BAD_HANDOFF"
            assert info.value.reason == expected, info.value
            if case not in ("token outside", "token not hex"):  # a bad token names nothing to remove
                assert list(directory.iterdir()) == []  # refused, and removed
            assert elsewhere.read_bytes() == b"w" * 100  # nothing outside the handoff dir touched
            assert list((tmp_path / "store" / "staging").iterdir()) == []
            assert not (tmp_path / "store" / "objects" / TENANT).exists()

    run(scenario)


def test_a_digest_that_does_not_match_is_caught_by_every_read(tmp_path):
    """The service records the caller's digests without re-reading the bytes; a wrong one
    (a caller's bug) shows as DATA_LOSS on read, never as wrong bytes."""

    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, directory):
            token, described = hand_over(directory, _contents())
            described[1].sha256 = hashlib.sha256(b"something else").hexdigest()
            await adopt(stub_for(address), checkpoint_pb2.AdoptCheckpointRequest(
                header=header(), handoff=token, files=described))
            client = CheckpointStorageClient(address, timeout_s=30)
            with pytest.raises(DataLossError) as info:
                await client.read(TENANT, STATE)
            await client.close()
        assert info.value.reason == "CHECKSUM_MISMATCH"

    run(scenario)


def test_a_malformed_digest_is_refused(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path) as (address, directory):
            token, described = hand_over(directory, _contents())
            described[0].sha256 = "not a digest"
            with pytest.raises(InvalidArgumentError) as info:
                await adopt(stub_for(address), checkpoint_pb2.AdoptCheckpointRequest(
                    header=header(), handoff=token, files=described))
        assert info.value.reason == "BAD_HANDOFF"

    run(scenario)


def test_a_handoff_past_the_tenants_quota_is_refused_and_leaves_nothing(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path, quota=120) as (address, directory):
            client = CheckpointStorageClient(address, timeout_s=30, handoff_dir=directory)
            with pytest.raises(ResourceExhaustedError) as info:
                await client.write(TENANT, header(), {name: [data] for name, data in _contents().items()})
            small = {FILES[0]: [b"{}\n"], FILES[1]: [b"w" * 10], FILES[2]: [b"o" * 10]}
            await client.write(TENANT, header(), small)  # the refused one reserved nothing
            await client.close()
        assert info.value.reason == "STORAGE_QUOTA"
        assert list(directory.iterdir()) == []

    run(scenario)


def test_the_sweep_removes_old_leftovers_only(tmp_path):
    directory = HandoffDir(tmp_path / "handoff", tmp_path, max_age_s=600)
    old, _ = hand_over(directory.path, _contents())
    fresh, _ = hand_over(directory.path, _contents())
    stray = directory.path / "stray-file"
    stray.write_bytes(b"x")
    now = os.stat(directory.path / fresh).st_mtime
    os.utime(directory.path / old, (now - 601, now - 601))
    os.utime(stray, (now - 601, now - 601))
    assert directory.sweep(now) == 2
    assert [p.name for p in directory.path.iterdir()] == [fresh]


def test_a_handoff_dir_on_another_filesystem_is_refused_at_start(tmp_path):
    shm = pathlib.Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    other = shm / f"tunemesh-handoff-test-{os.getpid()}"
    try:
        with pytest.raises(ValueError, match="not on the filesystem of the store"):
            HandoffDir(other, tmp_path)
    finally:
        with contextlib.suppress(OSError):
            other.rmdir()


def test_a_writer_that_fails_leaves_nothing_in_the_handoff_dir(tmp_path):
    with pytest.raises(TypeError):  # not a buffer: the second file fails half written
        handoff.write_files(tmp_path, {FILES[0]: [b"{}"], FILES[1]: [b"ab", object()]})
    assert list(tmp_path.iterdir()) == []
    token, described = handoff.write_files(tmp_path, {FILES[0]: [b"ab", np.arange(3, dtype=np.float32)]})
    data = (tmp_path / token / FILES[0]).read_bytes()
    assert data == b"ab" + np.arange(3, dtype=np.float32).tobytes()
    assert described == [checkpoints_pb2.CheckpointFile(name=FILES[0], size_bytes=14,
                                                         sha256=hashlib.sha256(data).hexdigest())]


def test_a_handoff_the_service_never_got_is_removed_by_the_client(tmp_path):
    async def scenario() -> None:
        async with checkpoint_service(tmp_path / "store") as (address, directory):
            pass  # stopped: its port refuses
        client = CheckpointStorageClient(address, timeout_s=5, handoff_dir=directory)
        with pytest.raises(UnavailableError):
            await client.write(TENANT, header(), files())
        await client.close()
        assert list(directory.iterdir()) == []

    run(scenario)
