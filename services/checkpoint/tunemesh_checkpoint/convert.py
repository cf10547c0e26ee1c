"""Checkpoint records <-> protos, the chunked file streams of uploads, and the scheduler's
call-store requests."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from google.protobuf import timestamp_pb2

from tunemesh.v1 import checkpoints_pb2, types_pb2
from tunemesh_checkpoint.catalog import CheckpointRecord, CheckpointSpec
from tunemesh_common.checkpoints.paths import CheckpointKind, CheckpointPath
from tunemesh.errors import InvalidArgumentError, ResourceExhaustedError

KINDS = {
    CheckpointKind.STATE: checkpoints_pb2.CHECKPOINT_KIND_STATE,
    CheckpointKind.SAMPLER: checkpoints_pb2.CHECKPOINT_KIND_SAMPLER,
    CheckpointKind.IMPORTED: checkpoints_pb2.CHECKPOINT_KIND_IMPORTED,
}
LORA_FIELDS = ("rank", "alpha", "train_attn", "train_mlp", "train_unembed", "train_experts", "seed")


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    return timestamp_pb2.Timestamp(seconds=whole + nanos // 10**9, nanos=nanos % 10**9)


def lora_dict(msg: types_pb2.LoraConfig) -> dict:
    return {name: getattr(msg, name) for name in LORA_FIELDS}


def checkpoint(record: CheckpointRecord) -> checkpoints_pb2.Checkpoint:
    msg = checkpoints_pb2.Checkpoint(
        path=str(record.path),
        kind=KINDS[record.path.kind],
        run=record.path.run,
        name=record.path.name,
        base_model=record.base_model,
        lora_config=types_pb2.LoraConfig(**{k: record.lora[k] for k in LORA_FIELDS if k in record.lora}),
        step=record.step,
        has_optimizer_state=record.has_optimizer_state,
        size_bytes=record.size_bytes,
        create_time=timestamp(record.create_time),
        user_metadata=record.user_metadata,
        files=[checkpoints_pb2.CheckpointFile(name=f.name, size_bytes=f.size, sha256=f.sha256) for f in record.files],
    )
    if record.expire_time is not None:
        msg.expire_time.CopyFrom(timestamp(record.expire_time))
    return msg


def checkpoint_spec(header) -> CheckpointSpec:
    """The CheckpointSpec a WriteCheckpointHeader declares."""
    return CheckpointSpec(
        path=CheckpointPath.parse(header.path), base_model=header.base_model, lora=lora_dict(header.lora_config),
        step=header.step, has_optimizer_state=header.has_optimizer_state, ttl_seconds=header.ttl_seconds,
        user_metadata=dict(header.user_metadata),
    )


class Upload:
    """A header-then-chunks request stream, read one chunk at a time.

    A file's chunks must be contiguous and in order (offset = bytes so far), each file
    may appear once, and the stream may carry at most `max_bytes` of file data.
    """

    def __init__(self, requests: AsyncIterator, max_bytes: int) -> None:
        self._requests = aiter(requests)
        self._max_bytes = max_bytes

    async def header(self):
        first = await anext(self._requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgumentError("BAD_UPLOAD", "the first message must carry the header")
        return first.header

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """(file name, data) per chunk, as each arrives; a file's chunks come together."""
        seen, total, name, size = set(), 0, None, 0
        async for request in self._requests:
            if request.WhichOneof("part") != "chunk":
                raise InvalidArgumentError("BAD_UPLOAD", "only the first message may carry a header")
            chunk = request.chunk
            if chunk.file_name != name:
                if chunk.file_name in seen:
                    raise InvalidArgumentError("BAD_UPLOAD", f"{chunk.file_name[:100]!r} was sent in two parts")
                name, size = chunk.file_name, 0
                seen.add(name)
            if chunk.offset != size:
                raise InvalidArgumentError("BAD_UPLOAD", f"{name[:100]!r}: chunk at offset {chunk.offset}, expected {size}")
            data = chunk.data  # each read of a bytes field copies it
            total += len(data)
            if total > self._max_bytes:
                raise ResourceExhaustedError("UPLOAD_TOO_LARGE", f"uploads are limited to {self._max_bytes} bytes")
            size += len(data)
            yield name, data


async def call_upload(requests: AsyncIterator, max_bytes: int) -> tuple[str, int, list[bytes]]:
    """(run, seq_id, chunks) of a PutCall stream: its key first, then at most `max_bytes`
    of data (the chunks are not joined)."""
    requests = aiter(requests)
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != "key":
        raise InvalidArgumentError("BAD_UPLOAD", "the first message must carry the call's key")
    chunks, total = [], 0
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgumentError("BAD_UPLOAD", "only the first message may carry a key")
        chunk = request.chunk  # each read of a bytes field copies it
        total += len(chunk)
        if total > max_bytes:
            raise ResourceExhaustedError("UPLOAD_TOO_LARGE", f"uploads are limited to {max_bytes} bytes")
        chunks.append(chunk)
    return first.key.run, first.key.seq_id, chunks


def calls_through(request) -> int | None:
    """The last seq_id a DeleteCallsRequest deletes (None: all of the run's calls)."""
    which = request.WhichOneof("calls")
    if which == "all" and request.all:
        return None
    if which == "through_seq_id":
        return request.through_seq_id
    raise InvalidArgumentError("BAD_CALL_RANGE", "DeleteCalls needs through_seq_id or all=true")
