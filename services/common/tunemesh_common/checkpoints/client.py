"""Clients of the internal CheckpointStorageService: checkpoints for trainers and samplers,
the call store for the scheduler.

Files and calls travel as 1 MiB chunks (or, for a checkpoint written on the service's own
host, as files handed over by rename); checkpoint reads are verified end to end (size and
sha256 against the checkpoint's manifest) on top of the store's own check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import pathlib
from collections.abc import AsyncIterator

import grpc

from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh.v1 import checkpoints_pb2
from tunemesh.errors import DataLossError, FailedPreconditionError
from tunemesh_common.checkpoints import handoff
from tunemesh_common.checkpoints.uploads import send_upload
from tunemesh_common.service.rpc import CHANNEL_OPTIONS, TENANT_KEY, error_from_peer
from tunemesh_common.security.tls import MeshTls, identity_name, open_channel

log = logging.getLogger(__name__)
CHECKPOINT_IDENTITY = identity_name("checkpoint")  # what the checkpoint service's certificate proves

CHUNK_BYTES = 1 << 20
CALL_STORE_CALLER = "tunemesh-scheduler"  # the call store belongs to no tenant: `tunemesh-tenant` names the caller


class CheckpointStorageClient:
    """Writes and reads whole checkpoints; one channel to the checkpoint service.

    With `handoff_dir` (the service's handoff directory, on this host) a write leaves the
    files there and the service takes them by rename (AdoptCheckpoint), instead of
    streaming their bytes; a service without one gets streamed writes (logged once)."""

    def __init__(self, address: str, timeout_s: float = 600.0, chunk_bytes: int = CHUNK_BYTES,
                 tls: MeshTls | None = None, handoff_dir: pathlib.Path | None = None) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        self._handoff_dir = handoff_dir
        # One handoff written at a time: a round's snapshots (one per run) would otherwise
        # take every core at once, beside the engine thread they come from.
        self._handoff_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-handoff")
        self._channel = open_channel(address, tls, CHECKPOINT_IDENTITY, CHANNEL_OPTIONS) if address else None
        self._stub = checkpoint_pb2_grpc.CheckpointStorageServiceStub(self._channel) if address else None

    def _require(self) -> checkpoint_pb2_grpc.CheckpointStorageServiceStub:
        if self._stub is None:
            raise FailedPreconditionError("NO_CHECKPOINT_SERVICE", "this node was started without a checkpoint service")
        return self._stub

    async def write(
        self, tenant: str, header: checkpoint_pb2.WriteCheckpointHeader, files: dict[str, list]
    ) -> checkpoints_pb2.Checkpoint:
        """Upload `files` (name -> buffers in order) as a new checkpoint; returns it once
        committed. Buffers are cut into chunks as they are sent, never joined (or, with a
        handoff directory, written there and taken by the service)."""
        stub = self._require()
        if self._handoff_dir is not None:
            try:
                return await self._hand_over(stub, tenant, header, files)
            except FailedPreconditionError as err:
                if err.reason != "NO_HANDOFF_DIR":
                    raise
                log.warning("checkpoint service %s has no handoff directory: streaming checkpoints", self.address)
                self._handoff_dir = None

        async def requests() -> AsyncIterator[checkpoint_pb2.WriteCheckpointRequest]:
            yield checkpoint_pb2.WriteCheckpointRequest(header=header)
            for name, parts in files.items():
                for offset, data in _chunks(parts, self._chunk_bytes):
                    chunk = checkpoints_pb2.FileChunk(file_name=name, offset=offset, data=data)
                    yield checkpoint_pb2.WriteCheckpointRequest(chunk=chunk)

        try:
            call = stub.WriteCheckpoint(timeout=self._timeout_s, metadata=_tenant(tenant))
            response = await send_upload(call, requests())  # a refusal stops the feed at once
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, f"checkpoint service {self.address}") from None
        return response.checkpoint

    async def _hand_over(self, stub, tenant: str, header: checkpoint_pb2.WriteCheckpointHeader,
                         files: dict[str, list]) -> checkpoints_pb2.Checkpoint:
        """Write the files into the handoff directory (in a worker thread) and have the
        service take them; nothing is left behind either way."""
        handoff_dir = self._handoff_dir
        token, described = await asyncio.get_running_loop().run_in_executor(
            self._handoff_writer, handoff.write_files, handoff_dir, files)
        try:
            request = checkpoint_pb2.AdoptCheckpointRequest(header=header, handoff=token, files=described)
            response = await stub.AdoptCheckpoint(request, timeout=self._timeout_s, metadata=_tenant(tenant))
        except BaseException as err:  # the service removes what it answered for; not what it never got
            await asyncio.to_thread(handoff.discard, handoff_dir, token)
            if isinstance(err, grpc.aio.AioRpcError):
                raise error_from_peer(err, f"checkpoint service {self.address}") from None
            raise
        return response.checkpoint

    async def read(self, tenant: str, path: str) -> tuple[checkpoints_pb2.Checkpoint, dict[str, bytearray]]:
        """The tenant's checkpoint at `path` and its files, verified."""
        stub = self._require()
        checkpoint, files = None, {}  # file name -> chunks (joined once, at the end)
        try:
            async for response in stub.ReadCheckpoint(
                checkpoint_pb2.ReadCheckpointRequest(path=path), timeout=self._timeout_s, metadata=_tenant(tenant)
            ):
                if response.WhichOneof("part") == "checkpoint":
                    checkpoint = response.checkpoint
                else:
                    files.setdefault(response.chunk.file_name, []).append(response.chunk.data)
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, f"checkpoint service {self.address}") from None
        if checkpoint is None:
            raise DataLossError("EMPTY_CHECKPOINT_STREAM", f"no checkpoint came back for {path}")
        return checkpoint, _verified(checkpoint, files)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._handoff_writer.shutdown(wait=False)


class CallStoreClient:
    """The scheduler's calls too large for etcd, kept by the checkpoint service under
    (run name, seq_id); one channel to it. Errors come back typed (transport failures as
    UnavailableError)."""

    def __init__(self, address: str, timeout_s: float = 600.0, chunk_bytes: int = CHUNK_BYTES,
                 tls: MeshTls | None = None) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        self._channel = open_channel(address, tls, CHECKPOINT_IDENTITY, CHANNEL_OPTIONS)
        self._stub = checkpoint_pb2_grpc.CheckpointStorageServiceStub(self._channel)

    async def put(self, run: str, seq_id: int, data: bytes) -> None:
        """Keep `data` (replacing what was kept under the same key); returns once it is durable."""

        async def requests() -> AsyncIterator[checkpoint_pb2.PutCallRequest]:
            yield checkpoint_pb2.PutCallRequest(key=checkpoint_pb2.CallKey(run=run, seq_id=seq_id))
            for _, piece in _chunks([data], self._chunk_bytes):
                yield checkpoint_pb2.PutCallRequest(chunk=piece)

        with self._errors():
            await self._stub.PutCall(requests(), timeout=self._timeout_s, metadata=_CALLER)

    async def get(self, run: str, seq_id: int) -> bytes:
        """The bytes kept under the key; NotFoundError(CALL_NOT_FOUND) when none are."""
        request = checkpoint_pb2.GetCallRequest(key=checkpoint_pb2.CallKey(run=run, seq_id=seq_id))
        with self._errors():
            return b"".join([r.chunk async for r in self._stub.GetCall(request, timeout=self._timeout_s,
                                                                       metadata=_CALLER)])

    async def delete(self, run: str, through_seq_id: int | None = None) -> int:
        """Delete the run's calls up to `through_seq_id` (None: all); returns how many."""
        request = checkpoint_pb2.DeleteCallsRequest(run=run)
        if through_seq_id is None:
            request.all = True
        else:
            request.through_seq_id = through_seq_id
        with self._errors():
            response = await self._stub.DeleteCalls(request, timeout=self._timeout_s, metadata=_CALLER)
        return response.deleted_count

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, f"checkpoint service {self.address}") from None

    async def close(self) -> None:
        await self._channel.close()


def _chunks(parts: list, size: int):
    """(offset, bytes) pieces of `size` bytes (the last may be shorter) over consecutive
    buffers: small buffers are packed together, large ones cut without an extra copy.
    An empty file still yields one empty piece, so it exists on the other side."""
    offset, pending = 0, bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            if not pending and len(view) >= size:
                piece, view = bytes(view[:size]), view[size:]
            else:
                take = size - len(pending)
                pending += view[:take]
                view = view[take:]
                if len(pending) < size:
                    continue
                piece, pending = bytes(pending), bytearray()
            yield offset, piece
            offset += size
    if pending or offset == 0:
        yield offset, bytes(pending)


def _tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_KEY, tenant),)


_CALLER = _tenant(CALL_STORE_CALLER)


def _verified(checkpoint: checkpoints_pb2.Checkpoint, files: dict[str, list[bytes]]) -> dict[str, bytearray]:
    """Each file joined once into a writable buffer (arrays may view it), size and sha256
    checked against the checkpoint."""
    expected = {f.name: f for f in checkpoint.files}
    extra = sorted(set(files) - set(expected))
    if extra:
        raise DataLossError("CHECKSUM_MISMATCH", f"{checkpoint.path}: unexpected file {extra[0][:100]!r}")
    out = {}
    for name, info in expected.items():
        data = bytearray().join(files.get(name, ()))
        if len(data) != info.size_bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise DataLossError("CHECKSUM_MISMATCH", f"{checkpoint.path}: {name} does not match its sha256")
        out[name] = data
    return out
