"""gRPC servicers of the checkpoint process: the public CheckpointService (reached through
the scheduler, which names the tenant) and the internal CheckpointStorageService (trainers,
samplers; the scheduler's call store). Store I/O runs in worker threads so the event loop
keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from tunemesh_checkpoint import convert
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh_checkpoint.catalog import CheckpointCatalog, check_file_name
from tunemesh_checkpoint.file_feed import write_files
from tunemesh_checkpoint.handoff import HandoffDir
from tunemesh_common.checkpoints.uploads import refusals_after_drain
from tunemesh.errors import FailedPreconditionError, UnimplementedError
from tunemesh_common.service.rpc import current_tenant


class CheckpointServicer(checkpoints_pb2_grpc.CheckpointServiceServicer):
    def __init__(self, catalog: CheckpointCatalog, chunk_bytes: int, max_upload_bytes: int) -> None:
        self._catalog, self._chunk_bytes, self._max_upload_bytes = catalog, chunk_bytes, max_upload_bytes

    async def ListCheckpoints(self, request, context):
        records, token = await asyncio.to_thread(
            self._catalog.list, current_tenant(), request.run, request.page_size, request.page_token
        )
        return checkpoints_pb2.ListCheckpointsResponse(
            checkpoints=[convert.checkpoint(r) for r in records], next_page_token=token
        )

    async def GetCheckpoint(self, request, context):
        record = await asyncio.to_thread(self._catalog.get, current_tenant(), request.path)
        return checkpoints_pb2.GetCheckpointResponse(checkpoint=convert.checkpoint(record))

    async def DeleteCheckpoint(self, request, context):
        await asyncio.to_thread(self._catalog.delete, current_tenant(), request.path)
        return checkpoints_pb2.DeleteCheckpointResponse()

    async def UpdateCheckpointTtl(self, request, context):
        record = await asyncio.to_thread(self._catalog.set_ttl, current_tenant(), request.path, request.ttl_seconds)
        return checkpoints_pb2.UpdateCheckpointTtlResponse(checkpoint=convert.checkpoint(record))

    async def DownloadCheckpoint(self, request, context):
        async for part in _stream(self._catalog, current_tenant(), request.path, self._chunk_bytes):
            yield checkpoints_pb2.DownloadCheckpointResponse(**part)

    async def ImportCheckpoint(self, request_iterator, context):
        """Streamed to disk as it arrives (a few chunks in memory, whatever the size)."""
        async with refusals_after_drain(context, request_iterator):
            upload = convert.Upload(request_iterator, self._max_upload_bytes)
            header = await upload.header()
            adapter = await asyncio.to_thread(self._catalog.open_import, current_tenant(), header.name,
                                              header.base_model, header.ttl_seconds, dict(header.user_metadata))
            try:
                await write_files(upload.chunks(), adapter.write_file)
                record = await asyncio.to_thread(adapter.commit)
            finally:
                if not adapter.committed:
                    await asyncio.to_thread(adapter.abort)
        return checkpoints_pb2.ImportCheckpointResponse(checkpoint=convert.checkpoint(record))


class StorageServicer(checkpoint_pb2_grpc.CheckpointStorageServiceServicer):
    def __init__(self, catalog: CheckpointCatalog, chunk_bytes: int, max_upload_bytes: int,
                 calls: FilesystemCallStore | None = None, handoff: HandoffDir | None = None) -> None:
        self._catalog, self._chunk_bytes, self._max_upload_bytes = catalog, chunk_bytes, max_upload_bytes
        self._calls, self._handoff = calls, handoff

    async def WriteCheckpoint(self, request_iterator, context):
        """Each file goes to the store chunk by chunk as it arrives; the commit (one rename)
        happens only after the stream ended, so an interrupted write never shows."""
        async with refusals_after_drain(context, request_iterator):
            upload = convert.Upload(request_iterator, self._max_upload_bytes)
            header = await upload.header()
            spec = convert.checkpoint_spec(header)
            writer = await asyncio.to_thread(self._catalog.open_write, current_tenant(), spec)
            try:
                written = await write_files(upload.chunks(), lambda name, chunks: writer.write_blob(
                    check_file_name(name), chunks))
                record = await asyncio.to_thread(self._catalog.commit, writer, spec, written)
            finally:
                if not writer.committed:
                    await asyncio.to_thread(writer.abort)
        return checkpoint_pb2.WriteCheckpointResponse(checkpoint=convert.checkpoint(record))

    async def AdoptCheckpoint(self, request, context):
        """Files a caller on this host left in the handoff directory, taken by rename."""
        if self._handoff is None:
            raise FailedPreconditionError(
                "NO_HANDOFF_DIR", "this checkpoint service has no handoff directory: stream the files (WriteCheckpoint)")
        spec = convert.checkpoint_spec(request.header)
        record = await asyncio.to_thread(self._handoff.take, self._catalog, current_tenant(), spec, request.handoff,
                                         list(request.files), self._max_upload_bytes)
        return checkpoint_pb2.AdoptCheckpointResponse(checkpoint=convert.checkpoint(record))

    async def ReadCheckpoint(self, request, context):
        async for part in _stream(self._catalog, current_tenant(), request.path, self._chunk_bytes):
            yield checkpoint_pb2.ReadCheckpointResponse(**part)

    async def PutCall(self, request_iterator, context):
        run, seq_id, chunks = await convert.call_upload(request_iterator, self._max_upload_bytes)
        size = await asyncio.to_thread(self._call_store().put, run, seq_id, chunks)
        return checkpoint_pb2.PutCallResponse(size_bytes=size)

    async def GetCall(self, request, context):
        key = request.key
        chunks = await asyncio.to_thread(self._call_store().read, key.run, key.seq_id, self._chunk_bytes)
        while (chunk := await asyncio.to_thread(_next, chunks)) is not None:
            yield checkpoint_pb2.GetCallResponse(chunk=chunk)

    async def DeleteCalls(self, request, context):
        count = await asyncio.to_thread(self._call_store().delete, request.run, convert.calls_through(request))
        return checkpoint_pb2.DeleteCallsResponse(deleted_count=count)

    def _call_store(self) -> FilesystemCallStore:
        if self._calls is None:
            raise UnimplementedError("NO_CALL_STORE", "this checkpoint service keeps no calls")
        return self._calls


async def _stream(catalog: CheckpointCatalog, tenant: str, path: str, chunk_bytes: int):
    """{"checkpoint": ...} first, then {"chunk": ...} per file chunk (read in a thread)."""
    record, chunks = await asyncio.to_thread(catalog.read, tenant, path, chunk_bytes)
    yield {"checkpoint": convert.checkpoint(record)}
    while (item := await asyncio.to_thread(_next, chunks)) is not None:
        name, offset, data = item
        yield {"chunk": checkpoints_pb2.FileChunk(file_name=name, offset=offset, data=data)}


def _next(chunks: Iterator):
    return next(chunks, None)
